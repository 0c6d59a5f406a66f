//! A one-value channel whose receiving end is a future: how a buffer mapping's callback hands
//! its result to the `async` readback. Natively the device poll has already run the callback
//! when the future is first polled; in a browser the page's event loop runs it later and wakes
//! the future.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

struct Slot<T> {
    value: Option<T>,
    waker: Option<Waker>,
}

/// The receiving end: a future of the value sent.
pub(crate) struct Receiver<T>(Arc<Mutex<Slot<T>>>);

/// A sender (a callback taking the value) and the future that resolves to what it sends.
pub(crate) fn oneshot<T: Send + 'static>() -> (impl FnOnce(T) + Send + 'static, Receiver<T>) {
    let slot = Arc::new(Mutex::new(Slot {
        value: None,
        waker: None,
    }));
    let sender = {
        let slot = slot.clone();
        move |value| {
            let mut slot = slot.lock().unwrap();
            slot.value = Some(value);
            if let Some(waker) = slot.waker.take() {
                waker.wake();
            }
        }
    };
    (sender, Receiver(slot))
}

impl<T> Future for Receiver<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let mut slot = self.0.lock().unwrap();
        match slot.value.take() {
            Some(value) => Poll::Ready(value),
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

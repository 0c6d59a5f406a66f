//! A line chart on a log scale, drawn pixel by pixel: the axes, a grid line and label at each
//! power of ten, and labelled ticks along x. Enough for `eval`'s picture of `L_t` against `t`.

use image::{Rgb, RgbImage};

const WIDTH: u32 = 760;
const HEIGHT: u32 = 440;
/// Left, right, top and bottom margins.
const MARGIN: (u32, u32, u32, u32) = (70, 20, 20, 40);
const INK: Rgb<u8> = Rgb([40, 40, 40]);
const GRID: Rgb<u8> = Rgb([222, 222, 222]);
const LINE: Rgb<u8> = Rgb([31, 90, 180]);

/// 3 x 5 glyphs, one row of three bits per entry, the top row first.
fn glyph(c: char) -> [u8; 5] {
    match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 3, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 1, 1],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '-' => [0, 0, 7, 0, 0],
        'e' => [0, 7, 7, 4, 7],
        _ => [0; 5],
    }
}

/// Writes `text` with its top-left corner at `(x, y)`, each glyph pixel a 2 x 2 block.
fn text(img: &mut RgbImage, x: i64, y: i64, text: &str) {
    for (k, c) in text.chars().enumerate() {
        for (row, bits) in glyph(c).iter().enumerate() {
            for col in 0..3 {
                if bits >> (2 - col) & 1 == 1 {
                    for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                        let px = x + k as i64 * 8 + col * 2 + dx;
                        put(img, px, y + row as i64 * 2 + dy, INK);
                    }
                }
            }
        }
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if (0..img.width() as i64).contains(&x) && (0..img.height() as i64).contains(&y) {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// A straight line by stepping along its longer axis.
fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb<u8>) {
    let n = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as usize;
    for i in 0..=n {
        let f = i as f64 / n as f64;
        put(
            img,
            (x0 + f * (x1 - x0)).round() as i64,
            (y0 + f * (y1 - y0)).round() as i64,
            c,
        );
    }
}

/// The chart of the positive values of `points` (x, y) with y on a log scale and x over
/// `[0, x_max]`; a point that is not positive breaks the line.
pub fn log_chart(points: &[(f64, f64)], x_max: f64) -> RgbImage {
    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, Rgb([255, 255, 255]));
    let (left, right, top, bottom) = MARGIN;
    let (x0, x1) = (left as f64, (WIDTH - right) as f64);
    let (y0, y1) = ((HEIGHT - bottom) as f64, top as f64);
    let logs: Vec<f64> = points
        .iter()
        .filter(|p| p.1 > 0.0 && p.1.is_finite())
        .map(|p| p.1.log10())
        .collect();
    let lo = logs.iter().copied().fold(f64::INFINITY, f64::min).floor();
    let hi = logs
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max)
        .ceil();
    let (lo, hi) = if lo.is_finite() {
        (lo, hi.max(lo + 1.0))
    } else {
        (-1.0, 0.0)
    };
    let px = |x: f64| x0 + (x1 - x0) * x / x_max.max(1.0);
    let py = |log: f64| y0 + (y1 - y0) * (log - lo) / (hi - lo);
    for decade in lo as i64..=hi as i64 {
        let y = py(decade as f64);
        line(&mut img, (x0, y), (x1, y), GRID);
        text(&mut img, 8, y as i64 - 5, &format!("1e{decade}"));
    }
    for k in 0..=4 {
        let t = (x_max * k as f64 / 4.0).round();
        let x = px(t);
        line(&mut img, (x, y0), (x, y0 + 5.0), INK);
        let label = format!("{t}");
        text(
            &mut img,
            x as i64 - 4 * label.len() as i64,
            y0 as i64 + 10,
            &label,
        );
    }
    line(&mut img, (x0, y0), (x1, y0), INK);
    line(&mut img, (x0, y0), (x0, y1), INK);
    let mut last: Option<(f64, f64)> = None;
    for &(x, y) in points {
        let here = (y > 0.0 && y.is_finite()).then(|| (px(x), py(y.log10())));
        if let (Some(a), Some(b)) = (last, here) {
            line(&mut img, a, b, LINE);
        } else if let Some(b) = here {
            put(&mut img, b.0 as i64, b.1 as i64, LINE);
        }
        last = here;
    }
    img
}

//! A zip archive of files stored without compression (PKWARE's APPNOTE, method 0): how the
//! page hands a whole pipeline folder to the browser as one download. Safetensors weights
//! hardly compress, so storing them costs little.

/// Signatures of the three records.
const LOCAL_HEADER: u32 = 0x0403_4b50;
const CENTRAL_HEADER: u32 = 0x0201_4b50;
const END_OF_CENTRAL: u32 = 0x0605_4b50;
/// Version 2.0: what stored files and folders need.
const VERSION: u16 = 20;
/// General-purpose flag bit 11: names are UTF-8.
const UTF8_NAMES: u16 = 1 << 11;
/// 1980-01-01, the earliest date an archive can hold, in MS-DOS format.
const DOS_DATE: u16 = (1 << 5) | 1;

/// The archive of `files` (path inside the archive, contents).
pub fn stored(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in files {
        let offset = out.len() as u32;
        let crc = crc32(data);
        // Fields shared by the local and the central header, from "version needed" on.
        let mut common = Vec::new();
        put16(&mut common, VERSION);
        put16(&mut common, UTF8_NAMES);
        put16(&mut common, 0); // stored
        put16(&mut common, 0); // time 00:00:00
        put16(&mut common, DOS_DATE);
        put32(&mut common, crc);
        put32(&mut common, data.len() as u32); // compressed size
        put32(&mut common, data.len() as u32);
        put16(&mut common, name.len() as u16);
        put16(&mut common, 0); // extra field length

        put32(&mut out, LOCAL_HEADER);
        out.extend_from_slice(&common);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);

        put32(&mut central, CENTRAL_HEADER);
        put16(&mut central, VERSION); // made by
        central.extend_from_slice(&common);
        put16(&mut central, 0); // comment length
        put16(&mut central, 0); // disk number
        put16(&mut central, 0); // internal attributes
        put32(&mut central, 0); // external attributes
        put32(&mut central, offset);
        central.extend_from_slice(name.as_bytes());
    }
    let central_offset = out.len() as u32;
    out.extend_from_slice(&central);
    put32(&mut out, END_OF_CENTRAL);
    put16(&mut out, 0); // this disk
    put16(&mut out, 0); // the disk the directory starts on
    put16(&mut out, files.len() as u16);
    put16(&mut out, files.len() as u16);
    put32(&mut out, central.len() as u32);
    put32(&mut out, central_offset);
    put16(&mut out, 0); // comment length
    out
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// CRC-32 (IEEE 802.3), as zip checks each file.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(data);
    crc.sum()
}

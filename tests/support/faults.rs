//! Disk faults for the fault suite: flip a byte in, truncate, or delete a
//! file of a stopped daemon's data dir, and find the files to hit.

use std::path::{Path, PathBuf};

/// What is done to one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// One byte XOR 0x5a, in the middle of the file.
    Flip,
    /// Cut to half its length.
    Truncate,
    Delete,
}

impl Fault {
    pub const ALL: [Fault; 3] = [Fault::Flip, Fault::Truncate, Fault::Delete];

    /// Applies the fault to `path`.
    pub fn apply(self, path: &Path) {
        match self {
            Fault::Flip => {
                let mut bytes = std::fs::read(path).unwrap();
                assert!(!bytes.is_empty(), "{} is empty", path.display());
                let at = bytes.len() / 2;
                bytes[at] ^= 0x5a;
                std::fs::write(path, bytes).unwrap();
            }
            Fault::Truncate => {
                let len = std::fs::metadata(path).unwrap().len();
                let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
                f.set_len(len / 2).unwrap();
            }
            Fault::Delete => std::fs::remove_file(path).unwrap(),
        }
    }
}

/// Flips one byte inside the first occurrence of `needle` in `path`;
/// whether it was there.
pub fn flip_inside(path: &Path, needle: &[u8]) -> bool {
    let mut bytes = std::fs::read(path).unwrap();
    let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) else {
        return false;
    };
    bytes[at + needle.len() / 2] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
    true
}

/// The files of `dir` whose name satisfies `pick`, sorted.
pub fn files(dir: &Path, pick: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.file_name().and_then(|n| n.to_str()).is_some_and(&pick))
        .collect();
    out.sort();
    out
}

/// The RocksDB file kinds the suite hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RocksFile {
    Wal,
    Sst,
    Manifest,
    Current,
    Options,
}

impl RocksFile {
    pub const ALL: [RocksFile; 5] = [
        RocksFile::Wal,
        RocksFile::Sst,
        RocksFile::Manifest,
        RocksFile::Current,
        RocksFile::Options,
    ];

    /// The newest file of this kind in the RocksDB directory `db`.
    pub fn newest(self, db: &Path) -> Option<PathBuf> {
        let found = files(db, |n| match self {
            RocksFile::Wal => n.ends_with(".log") && n != "LOG",
            RocksFile::Sst => n.ends_with(".sst"),
            RocksFile::Manifest => n.starts_with("MANIFEST-"),
            RocksFile::Current => n == "CURRENT",
            RocksFile::Options => n.starts_with("OPTIONS-"),
        });
        found.into_iter().last()
    }
}

/// The body of a record copy file written by `kms::durable`
/// (`EKRC | 1 | name len | name | body len | body | sha256`).
pub fn record_body(raw: &[u8]) -> Vec<u8> {
    let name_len = u16::from_be_bytes([raw[5], raw[6]]) as usize;
    let at = 7 + name_len + 4;
    raw[at..raw.len() - 32].to_vec()
}

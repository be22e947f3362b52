//! Pairs stage (SPEC §2): `train.csv` (every ordered pair of two views of one outfit) and
//! `test.csv` (the standard 8,570 pairs), both with the header `from,to`.

use std::collections::HashMap;
use std::path::Path;

use super::report::StageReport;
use super::split::{SplitLists, TEST_CSV};
use crate::{Error, Result};

/// The clothing id and outfit of a flat name: everything before its last `_`
/// (`fashionMENPantsid0000161101_1front.jpg` -> `fashionMENPantsid0000161101`).
pub fn outfit_key(name: &str) -> &str {
    name.rsplit_once('_').map_or(name, |(head, _)| head)
}

/// Every ordered pair (a, b), a != b, of names sharing an outfit; outfits in order of first
/// appearance, pairs in list order, so the file is the same on every run.
pub fn train_pairs(names: &[String]) -> Vec<(String, String)> {
    let mut order: Vec<&str> = Vec::new();
    let mut groups: HashMap<&str, Vec<&str>> = HashMap::new();
    for n in names {
        let k = outfit_key(n);
        let g = groups.entry(k).or_insert_with(|| {
            order.push(k);
            Vec::new()
        });
        if !g.contains(&n.as_str()) {
            g.push(n);
        }
    }
    let mut out = Vec::new();
    for k in order {
        let g = &groups[k];
        for a in g {
            for b in g {
                if a != b {
                    out.push(((*a).to_owned(), (*b).to_owned()));
                }
            }
        }
    }
    out
}

/// CSV text with the `from,to` header.
pub fn pairs_csv(pairs: &[(String, String)]) -> String {
    let mut s = String::with_capacity(pairs.len() * 100 + 8);
    s.push_str("from,to\n");
    for (a, b) in pairs {
        s.push_str(a);
        s.push(',');
        s.push_str(b);
        s.push('\n');
    }
    s
}

/// Parses a pairs CSV (header `from,to`), naming the file and line of any bad row.
pub fn parse_pairs(path: &Path, text: &str) -> Result<Vec<(String, String)>> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, h)) if h.trim().trim_start_matches('\u{feff}') == "from,to" => {}
        Some((_, h)) => {
            return Err(Error::input(
                path,
                format!("line 1: expected the header `from,to`, found `{h}`"),
            ))
        }
        None => {
            return Err(Error::input(
                path,
                "empty file, expected the header `from,to`",
            ))
        }
    }
    let mut out = Vec::new();
    for (i, line) in lines {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let mut cols = line.split(',');
        match (cols.next(), cols.next(), cols.next()) {
            (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                out.push((a.to_owned(), b.to_owned()))
            }
            _ => {
                return Err(Error::input(
                    path,
                    format!("line {}: expected `from,to`, found `{line}`", i + 1),
                ))
            }
        }
    }
    Ok(out)
}

/// Reads a pairs CSV file.
pub fn read_pairs(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_pairs(path, &text)
}

/// Writes `train.csv` from the train list unless one is there (kept as is: it may be the
/// user's own list, e.g. the published 101,966 pairs), and `test.csv` unless one is there.
pub fn run_pairs(root: &Path, lists: &SplitLists) -> Result<StageReport> {
    let mut rep = StageReport::new("pairs");
    let train = root.join("train.csv");
    if train.is_file() {
        let n = read_pairs(&train)?.len();
        rep.skipped += 1;
        rep.notes
            .push(format!("kept existing {} ({n} pairs)", train.display()));
    } else {
        let pairs = train_pairs(&lists.train);
        crate::fsutil::write_atomic(&train, pairs_csv(&pairs).as_bytes())?;
        rep.done += 1;
        rep.notes
            .push(format!("wrote {} ({} pairs)", train.display(), pairs.len()));
    }
    let test = root.join("test.csv");
    if test.is_file() {
        let n = read_pairs(&test)?.len();
        rep.skipped += 1;
        rep.notes
            .push(format!("kept existing {} ({n} pairs)", test.display()));
    } else {
        crate::fsutil::write_atomic(&test, TEST_CSV.as_bytes())?;
        rep.done += 1;
        rep.notes.push(format!("wrote {}", test.display()));
    }
    Ok(rep)
}

//! The pose gallery: the image files directly inside `--poses`, listed once at start. A name
//! from the browser is only ever looked up in that list, never joined onto a path first, and
//! the file it names must still resolve inside the folder (a symlink out of it is refused).

use std::path::{Path, PathBuf};

use crate::{Error, Result};

pub struct Gallery {
    root: PathBuf,
    names: Vec<String>,
}

/// Why a gallery name was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum GalleryError {
    /// Not a plain file name (a separator, `..`, a leading dot, odd characters).
    BadName,
    NotFound,
    /// The file resolves outside the gallery folder.
    Outside,
}

impl GalleryError {
    pub fn message(&self, name: &str) -> String {
        match self {
            GalleryError::BadName => format!(
                "pose {name:?} refused: a gallery pose is a plain file name (letters, digits, \
                 '.', '_', '-'), not a path"
            ),
            GalleryError::NotFound => format!("pose {name:?} is not in the gallery"),
            GalleryError::Outside => {
                format!("pose {name:?} refused: it resolves outside the gallery folder")
            }
        }
    }
}

/// A plain file name of the gallery: no separators, no `..`, no hidden files, no odd characters.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Gallery {
    /// Lists the PNG and JPEG files directly inside `dir` whose names are plain.
    pub fn open(dir: &Path) -> Result<Self> {
        let root = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&root).map_err(|e| Error::io(&root, e))? {
            let entry = entry.map_err(|e| Error::io(&root, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let lower = name.to_ascii_lowercase();
            let is_image = [".png", ".jpg", ".jpeg"].iter().any(|e| lower.ends_with(e));
            if is_image && valid_name(&name) && entry.path().is_file() {
                names.push(name);
            }
        }
        names.sort();
        Ok(Self { root, names })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Names containing `filter` (case-insensitive): the total, and `limit` of them from `offset`.
    pub fn list(&self, filter: &str, offset: usize, limit: usize) -> (usize, Vec<String>) {
        let f = filter.to_ascii_lowercase();
        let hits: Vec<&String> = self
            .names
            .iter()
            .filter(|n| f.is_empty() || n.to_ascii_lowercase().contains(&f))
            .collect();
        let page = hits
            .iter()
            .skip(offset)
            .take(limit)
            .map(|s| s.to_string())
            .collect();
        (hits.len(), page)
    }

    /// The file of a listed name, checked to resolve inside the gallery folder.
    pub fn resolve(&self, name: &str) -> std::result::Result<PathBuf, GalleryError> {
        if !valid_name(name) {
            return Err(GalleryError::BadName);
        }
        if self
            .names
            .binary_search_by(|n| n.as_str().cmp(name))
            .is_err()
        {
            return Err(GalleryError::NotFound);
        }
        let path =
            std::fs::canonicalize(self.root.join(name)).map_err(|_| GalleryError::NotFound)?;
        if path.parent() != Some(self.root.as_path()) {
            return Err(GalleryError::Outside);
        }
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_paths_are_refused() {
        for bad in [
            "",
            "..",
            "../x.png",
            "a/b.png",
            "/etc/passwd",
            "a\\b.png",
            ".hidden.png",
            "x\0.png",
            "é.png",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(valid_name("WOMEN-Tees_Tanks-id_1.png"));
    }

    #[test]
    fn resolves_listed_files_only_and_stays_inside() {
        let d = tempfile::tempdir().unwrap();
        let g = d.path().join("poses");
        std::fs::create_dir(&g).unwrap();
        std::fs::write(g.join("a.png"), b"x").unwrap();
        std::fs::write(g.join("notes.txt"), b"x").unwrap();
        std::fs::write(d.path().join("secret.png"), b"x").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(d.path().join("secret.png"), g.join("link.png")).unwrap();
        let gal = Gallery::open(&g).unwrap();
        assert!(gal.resolve("a.png").is_ok());
        assert_eq!(gal.resolve("notes.txt"), Err(GalleryError::NotFound));
        assert_eq!(gal.resolve("../secret.png"), Err(GalleryError::BadName));
        assert_eq!(gal.resolve("missing.png"), Err(GalleryError::NotFound));
        #[cfg(unix)]
        assert_eq!(gal.resolve("link.png"), Err(GalleryError::Outside));
        let (n, page) = gal.list("", 0, 10);
        assert_eq!(n, page.len());
        assert!(page.contains(&"a.png".to_string()));
    }
}

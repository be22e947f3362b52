//! PyTorch checkpoints (zip and legacy pre-1.6 layouts) and plain numpy pickles (detectron2),
//! read through the restricted pickle machine, then turned into candle tensors.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};

use super::pickle::{unpickle, NdArray, StorageRef, TorchDType, TorchTensor, Value};
use crate::error::{Error, Result};

/// `torch.serialization.MAGIC_NUMBER`, the first pickle of a legacy checkpoint.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// True when `head` starts like a legacy torch checkpoint (protocol 2, LONG1 magic number).
pub fn is_legacy(head: &[u8]) -> bool {
    head.len() >= 14 && head[..4] == [0x80, 0x02, 0x8a, 0x0a] && head[4..14] == LEGACY_MAGIC
}

/// The storage part of a torch persistent id: `('storage', type, key, location, numel, ...)`.
fn storage_from_pid(pid: Value) -> std::result::Result<Value, String> {
    let items = match &pid {
        Value::Tuple(t) => t.as_ref().clone(),
        v => return Err(format!("persistent id is a {}, expected a tuple", v.kind())),
    };
    if items.len() < 5 || !matches!(&items[0], Value::Str(s) if &**s == "storage") {
        return Err("persistent id is not a ('storage', ...) tuple".into());
    }
    let dtype = match &items[1] {
        Value::Global(super::pickle::Global::Storage(d)) => *d,
        v => return Err(format!("storage type is a {}", v.kind())),
    };
    let key = match &items[2] {
        Value::Str(s) => s.to_string(),
        v => return Err(format!("storage key is a {}", v.kind())),
    };
    // Legacy files may reference a view `(view_key, offset, size)` of a bigger storage.
    let offset = match items.get(5) {
        Some(Value::Tuple(v)) if v.len() == 3 => match v[1] {
            Value::Int(o) if o >= 0 => o as usize,
            _ => return Err("storage view offset is not a non-negative int".into()),
        },
        _ => 0,
    };
    Ok(Value::Storage(Rc::new(StorageRef { key, dtype, offset })))
}

/// Zip-format checkpoint (`torch.save` since 1.6): `<prefix>data.pkl` + `<prefix>data/<key>`.
pub fn read_zip(path: &Path, device: &Device) -> Result<Loaded> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let zerr = |e: zip::result::ZipError| Error::weights(path, format!("zip archive: {e}"));
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(zerr)?;
    let names: Vec<String> = zip
        .file_names()
        .map(|s| s.map(|s| s.to_string()))
        .collect::<std::result::Result<_, _>>()
        .map_err(zerr)?;
    let Some(pkl) = names
        .iter()
        .filter(|n| n.ends_with("data.pkl"))
        .min_by_key(|n| n.len())
        .cloned()
    else {
        return Err(Error::weights(
            path,
            "zip archive has no data.pkl (not a torch checkpoint)",
        ));
    };
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let mut read_entry = |name: &str| -> Result<Vec<u8>> {
        let mut f = zip.by_name(name).map_err(zerr)?;
        // The header's size is untrusted: reserve at most what a sane entry needs up front.
        let mut buf = Vec::with_capacity((f.size() as usize).min(1 << 26));
        f.read_to_end(&mut buf)
            .map_err(|e| Error::weights(path, format!("reading {name}: {e}")))?;
        Ok(buf)
    };
    if names.contains(&format!("{prefix}byteorder")) {
        let bo = read_entry(&format!("{prefix}byteorder"))?;
        if bo.trim_ascii() != b"little" {
            return Err(Error::weights(
                path,
                "big-endian checkpoints are not supported",
            ));
        }
    }
    let data = read_entry(&pkl)?;
    let mut pid = storage_from_pid;
    let (root, _) = unpickle(path, &data, 0, Some(&mut pid))?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut fetch = |s: &StorageRef| -> Result<()> {
        if !storages.contains_key(&s.key) {
            let b = read_entry(&format!("{prefix}data/{}", s.key))?;
            storages.insert(s.key.clone(), b);
        }
        Ok(())
    };
    for_each_tensor(&root, &mut |t| fetch(&t.storage))?;
    finish(path, root, &storages, device)
}

/// Legacy checkpoint: magic, protocol, sys info and main pickles, then the storage keys and
/// each storage as `numel: i64 LE` + raw bytes.
pub fn read_legacy(path: &Path, data: &[u8], device: &Device) -> Result<Loaded> {
    let (_, mut pos) = unpickle(path, data, 0, None)?;
    let (_, p) = unpickle(path, data, pos, None)?;
    pos = p;
    let (sys, p) = unpickle(path, data, pos, None)?;
    pos = p;
    if let Value::Dict(d) = &sys {
        for (k, v) in d.borrow().iter() {
            if matches!(k, Value::Str(s) if &**s == "little_endian")
                && matches!(v, Value::Bool(false))
            {
                return Err(Error::weights(
                    path,
                    "big-endian checkpoints are not supported",
                ));
            }
        }
    }
    let mut pid = storage_from_pid;
    let (root, p) = unpickle(path, data, pos, Some(&mut pid))?;
    pos = p;
    let (keys, p) = unpickle(path, data, pos, None)?;
    pos = p;
    let Value::List(keys) = &keys else {
        return Err(Error::weights(path, "storage key list is not a list"));
    };
    let mut dtypes: HashMap<String, TorchDType> = HashMap::new();
    for_each_tensor(&root, &mut |t| {
        dtypes.insert(t.storage.key.clone(), t.storage.dtype);
        Ok(())
    })?;
    let mut storages = HashMap::new();
    for k in keys.borrow().iter() {
        let Value::Str(k) = k else {
            return Err(Error::weights(path, "storage key is not a string"));
        };
        if data.len() - pos < 8 {
            return Err(Error::weights(
                path,
                format!("truncated before storage {k}"),
            ));
        }
        let numel = u64::from_le_bytes(data[pos..pos + 8].try_into().unwrap());
        pos += 8;
        // A storage no tensor uses still has to be skipped; its element size is unknown, so
        // such a file is refused rather than guessed.
        let Some(dt) = dtypes.get(&**k) else {
            return Err(Error::weights(
                path,
                format!("storage {k} is not used by any tensor"),
            ));
        };
        let nbytes = usize::try_from(numel)
            .ok()
            .and_then(|n| n.checked_mul(dt.size()))
            .filter(|&n| n <= data.len() - pos)
            .ok_or_else(|| {
                Error::weights(
                    path,
                    format!("storage {k}: {numel} elements run past the end of the file"),
                )
            })?;
        storages.insert(k.to_string(), data[pos..pos + nbytes].to_vec());
        pos += nbytes;
    }
    finish(path, root, &storages, device)
}

/// A pickle with no torch storages: detectron2's `{"model": {name: ndarray}}` and the like.
pub fn read_plain_pickle(path: &Path, data: &[u8], device: &Device) -> Result<Loaded> {
    let (root, _) = unpickle(path, data, 0, None)?;
    finish(path, root, &HashMap::new(), device)
}

/// What a checkpoint held besides its tensors.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    pub tensors: HashMap<String, Tensor>,
    /// The key the tensors were found under (`state_dict`, `model`, ...), if nested.
    pub nested_under: Option<String>,
    /// Entries next to the tensors that are not tensors (kept out of the map).
    pub skipped: Vec<String>,
}

/// Visits every tensor reachable from `v`, without recursion (nesting depth is untrusted).
fn for_each_tensor(v: &Value, f: &mut dyn FnMut(&TorchTensor) -> Result<()>) -> Result<()> {
    // Memo references can make containers contain themselves: visit each one once.
    let mut seen = std::collections::HashSet::new();
    let mut work = vec![v.clone()];
    while let Some(v) = work.pop() {
        match &v {
            Value::Tensor(t) => f(t)?,
            Value::Dict(d) if seen.insert(Rc::as_ptr(d) as *const u8) => {
                work.extend(d.borrow().iter().map(|(_, x)| x.clone()))
            }
            Value::List(l) if seen.insert(Rc::as_ptr(l) as *const u8) => {
                work.extend(l.borrow().iter().cloned())
            }
            Value::Tuple(t) => work.extend(t.iter().cloned()),
            _ => {}
        }
    }
    Ok(())
}

fn has_tensors(v: &Value) -> bool {
    match v {
        Value::Dict(d) => d.borrow().iter().any(|(_, x)| x.is_tensor()),
        _ => false,
    }
}

/// Keys under which training scripts commonly nest a state dict, tried in this order.
const NEST_KEYS: [&str; 7] = [
    "state_dict",
    "model",
    "module",
    "model_state_dict",
    "net",
    "params",
    "weights",
];

fn finish(
    path: &Path,
    root: Value,
    storages: &HashMap<String, Vec<u8>>,
    device: &Device,
) -> Result<Loaded> {
    let Value::Dict(top) = &root else {
        return Err(Error::weights(
            path,
            format!("top-level object is a {}, expected a dict", root.kind()),
        ));
    };
    let mut out = Loaded::default();
    let dict = if has_tensors(&root) {
        root.clone()
    } else {
        let top = top.borrow();
        let key_of = |k: &Value| match k {
            Value::Str(s) => Some(s.to_string()),
            _ => None,
        };
        let by_name = NEST_KEYS.iter().find_map(|want| {
            top.iter()
                .find(|(k, v)| key_of(k).as_deref() == Some(want) && has_tensors(v))
        });
        let only: Vec<_> = top.iter().filter(|(_, v)| has_tensors(v)).collect();
        let pick = by_name.or(if only.len() == 1 { Some(only[0]) } else { None });
        let Some((k, v)) = pick else {
            let keys: Vec<String> = top.iter().filter_map(|(k, _)| key_of(k)).collect();
            return Err(Error::weights(
                path,
                format!(
                    "no dict of tensors found at the top level or under one of its keys {keys:?}"
                ),
            ));
        };
        out.nested_under = key_of(k);
        v.clone()
    };
    let Value::Dict(d) = &dict else {
        unreachable!("has_tensors only accepts dicts")
    };
    for (k, v) in d.borrow().iter() {
        let name = match k {
            Value::Str(s) => s.to_string(),
            other => {
                out.skipped.push(format!("<{} key>", other.kind()));
                continue;
            }
        };
        let t = match v {
            Value::Tensor(t) => torch_tensor(t, storages, device)
                .map_err(|m| Error::weights(path, format!("tensor {name}: {m}")))?,
            Value::NdArray(a) => ndarray_tensor(&a.borrow(), device)
                .map_err(|m| Error::weights(path, format!("array {name}: {m}")))?,
            _ => {
                out.skipped.push(name);
                continue;
            }
        };
        out.tensors.insert(name, t);
    }
    Ok(out)
}

fn candle_dtype(d: TorchDType) -> std::result::Result<DType, String> {
    Ok(match d {
        TorchDType::F32 => DType::F32,
        TorchDType::F16 => DType::F16,
        TorchDType::BF16 => DType::BF16,
        TorchDType::F64 => DType::F64,
        TorchDType::I64 => DType::I64,
        TorchDType::I32 => DType::I32,
        TorchDType::I16 => DType::I16,
        TorchDType::U8 | TorchDType::Bool => DType::U8,
        TorchDType::I8 => return Err("int8 tensors are not supported by candle".into()),
    })
}

fn checked_numel(shape: &[usize]) -> std::result::Result<usize, String> {
    shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("shape {shape:?} overflows"))
}

/// Copies the elements a strided view selects into a contiguous buffer.
fn gather(
    src: &[u8],
    es: usize,
    offset: usize,
    size: &[usize],
    stride: &[usize],
) -> std::result::Result<Vec<u8>, String> {
    let numel = checked_numel(size)?;
    if numel == 0 {
        return Ok(Vec::new());
    }
    let mut last = offset;
    for (&n, &s) in size.iter().zip(stride) {
        last = (n - 1)
            .checked_mul(s)
            .and_then(|x| x.checked_add(last))
            .ok_or("view extent overflows")?;
    }
    let avail = src.len() / es;
    if last >= avail {
        return Err(format!(
            "view (offset {offset}, size {size:?}, stride {stride:?}) reaches element {last} of a storage with {avail}"
        ));
    }
    let mut contiguous = true;
    let mut expect = 1;
    for (&n, &s) in size.iter().zip(stride).rev() {
        if n != 1 && s != expect {
            contiguous = false;
        }
        expect *= n;
    }
    if contiguous {
        return Ok(src[offset * es..(offset + numel) * es].to_vec());
    }
    // Broadcast views (stride 0) may select more elements than the storage holds; a
    // failed reservation is an error here, not an abort.
    let nbytes = numel.checked_mul(es).ok_or("view size overflows")?;
    let mut out = Vec::new();
    out.try_reserve_exact(nbytes)
        .map_err(|_| format!("cannot allocate {nbytes} bytes for a {size:?} view"))?;
    let mut idx = vec![0usize; size.len()];
    for _ in 0..numel {
        let e: usize = offset + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(&src[e * es..(e + 1) * es]);
        for d in (0..size.len()).rev() {
            idx[d] += 1;
            if idx[d] < size[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(out)
}

fn torch_tensor(
    t: &TorchTensor,
    storages: &HashMap<String, Vec<u8>>,
    device: &Device,
) -> std::result::Result<Tensor, String> {
    let dt = t.storage.dtype;
    let dtype = candle_dtype(dt)?;
    let src = storages
        .get(&t.storage.key)
        .ok_or_else(|| format!("storage {} is missing from the file", t.storage.key))?;
    let es = dt.size();
    let buf = gather(src, es, t.storage.offset + t.offset, &t.size, &t.stride)?;
    let mut buf = buf;
    if dt == TorchDType::Bool {
        buf.iter_mut().for_each(|b| *b = (*b != 0) as u8);
    }
    Tensor::from_raw_buffer(&buf, dtype, &t.size, device).map_err(|e| e.to_string())
}

fn ndarray_tensor(a: &NdArray, device: &Device) -> std::result::Result<Tensor, String> {
    let dt = a
        .dtype
        .as_ref()
        .ok_or("array was never filled in (no BUILD)")?;
    let data = a.data.as_ref().ok_or("array has no data")?;
    if dt.compound {
        return Err(format!(
            "structured numpy dtype {} is not supported",
            dt.code
        ));
    }
    let code = dt.code.trim_start_matches(['<', '>', '=', '|']);
    let (dtype, es) = match code {
        "f2" => (DType::F16, 2),
        "f4" => (DType::F32, 4),
        "f8" => (DType::F64, 8),
        "i2" => (DType::I16, 2),
        "i4" => (DType::I32, 4),
        "i8" => (DType::I64, 8),
        "u1" | "b1" => (DType::U8, 1),
        "u4" => (DType::U32, 4),
        c => return Err(format!("numpy dtype {c} is not supported")),
    };
    let numel = checked_numel(&a.shape)?;
    if numel.checked_mul(es) != Some(data.len()) {
        return Err(format!(
            "{} bytes of data for shape {:?} of {code} ({} expected)",
            data.len(),
            a.shape,
            numel.saturating_mul(es)
        ));
    }
    let mut buf = data.to_vec();
    if dt.byteorder == ">" || dt.code.starts_with('>') {
        buf.chunks_exact_mut(es).for_each(|c| c.reverse());
    }
    if code == "b1" {
        buf.iter_mut().for_each(|b| *b = (*b != 0) as u8);
    }
    let err = |e: candle_core::Error| e.to_string();
    if a.fortran && a.shape.len() > 1 {
        // Fortran order is C order of the reversed shape, transposed back.
        let rev: Vec<usize> = a.shape.iter().rev().copied().collect();
        let t = Tensor::from_raw_buffer(&buf, dtype, &rev, device).map_err(err)?;
        let perm: Vec<usize> = (0..rev.len()).rev().collect();
        return t.permute(perm).and_then(|t| t.contiguous()).map_err(err);
    }
    Tensor::from_raw_buffer(&buf, dtype, &a.shape, device).map_err(err)
}

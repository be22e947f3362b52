//! A restricted pickle machine: it rebuilds dicts, lists, tuples, scalars, torch tensor views and
//! numpy arrays, and nothing else. Globals are looked up in a fixed whitelist when they are
//! pushed, so a pickle naming any other callable (`os.system`, `builtins.eval`, ...) is refused
//! before anything could run. Nothing here ever executes code from the file.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::error::{Error, Result};

/// Pickle opcodes by their names in CPython's `pickletools` (protocols 0-5); ranges in the
/// machine name only their ends, so a few middle ones go unused.
#[allow(dead_code)]
mod opcode {
    pub const PROTO: u8 = 0x80;
    pub const FRAME: u8 = 0x95;
    pub const STOP: u8 = b'.';
    pub const MARK: u8 = b'(';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const NONE: u8 = b'N';
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINFLOAT: u8 = b'G';
    pub const BINUNICODE: u8 = b'X';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const BINBYTES: u8 = b'B';
    pub const BINBYTES8: u8 = 0x8e;
    pub const BYTEARRAY8: u8 = 0x96;
    pub const READONLY_BUFFER: u8 = 0x98;
    pub const NEXT_BUFFER: u8 = 0x97;
    pub const EMPTY_TUPLE: u8 = b')';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const TUPLE: u8 = b't';
    pub const EMPTY_LIST: u8 = b']';
    pub const LIST: u8 = b'l';
    pub const EMPTY_DICT: u8 = b'}';
    pub const DICT: u8 = b'd';
    pub const EMPTY_SET: u8 = 0x8f;
    pub const FROZENSET: u8 = 0x91;
    pub const APPEND: u8 = b'a';
    pub const APPENDS: u8 = b'e';
    pub const ADDITEMS: u8 = 0x90;
    pub const SETITEM: u8 = b's';
    pub const SETITEMS: u8 = b'u';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const MEMOIZE: u8 = 0x94;
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const GLOBAL: u8 = b'c';
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const REDUCE: u8 = b'R';
    pub const NEWOBJ: u8 = 0x81;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const BUILD: u8 = b'b';
    pub const BINPERSID: u8 = b'Q';
    pub const INST: u8 = b'i';
    pub const OBJ: u8 = b'o';
    pub const EXT1: u8 = 0x82;
    pub const EXT2: u8 = 0x83;
    pub const EXT4: u8 = 0x84;
}

/// Element types of torch storages (`torch.FloatStorage`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TorchDType {
    F32,
    F16,
    BF16,
    F64,
    I64,
    I32,
    I16,
    U8,
    Bool,
    I8,
}

impl TorchDType {
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::U8 | Self::Bool | Self::I8 => 1,
        }
    }
}

/// The only callables a pickle may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Global {
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    RebuildParameterWithState,
    OrderedDict,
    Storage(TorchDType),
    NpReconstruct,
    NpNdarray,
    NpDtype,
    NpScalar,
    NpFrombuffer,
    CodecsEncode,
    Bytes,
}

fn lookup_global(module: &str, name: &str) -> Option<Global> {
    let np_core = matches!(module, "numpy.core.multiarray" | "numpy._core.multiarray");
    let np_numeric = matches!(module, "numpy.core.numeric" | "numpy._core.numeric");
    let g = match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch", s) => Global::Storage(match s {
            "FloatStorage" => TorchDType::F32,
            "HalfStorage" => TorchDType::F16,
            "BFloat16Storage" => TorchDType::BF16,
            "DoubleStorage" => TorchDType::F64,
            "LongStorage" => TorchDType::I64,
            "IntStorage" => TorchDType::I32,
            "ShortStorage" => TorchDType::I16,
            "ByteStorage" => TorchDType::U8,
            "BoolStorage" => TorchDType::Bool,
            "CharStorage" => TorchDType::I8,
            _ => return None,
        }),
        (_, "_reconstruct") if np_core => Global::NpReconstruct,
        (_, "scalar") if np_core => Global::NpScalar,
        (_, "_frombuffer") if np_numeric => Global::NpFrombuffer,
        ("numpy", "ndarray") => Global::NpNdarray,
        ("numpy", "dtype") => Global::NpDtype,
        ("_codecs", "encode") => Global::CodecsEncode,
        ("builtins" | "__builtin__", "bytes") => Global::Bytes,
        _ => return None,
    };
    Some(g)
}

/// A storage named by a persistent id: where its bytes are is up to the container format.
#[derive(Debug)]
pub struct StorageRef {
    pub key: String,
    pub dtype: TorchDType,
    /// Offset in elements (legacy checkpoints may name a view of a larger storage).
    pub offset: usize,
}

/// A torch tensor as a view on a storage.
#[derive(Debug)]
pub struct TorchTensor {
    pub storage: Rc<StorageRef>,
    pub offset: usize,
    pub size: Vec<usize>,
    pub stride: Vec<usize>,
}

/// A numpy dtype as far as the pickle tells it: type code (`f4`, `i8`, ...) and byte order.
#[derive(Debug, Clone)]
pub struct NpDType {
    pub code: String,
    pub byteorder: String,
    /// Structured or sub-array dtypes are refused when converted.
    pub compound: bool,
}

#[derive(Debug, Default)]
pub struct NdArray {
    pub shape: Vec<usize>,
    pub dtype: Option<NpDType>,
    pub fortran: bool,
    pub data: Option<Rc<[u8]>>,
}

#[derive(Clone, Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    BigInt(Vec<u8>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TorchTensor>),
    NdArray(Rc<RefCell<NdArray>>),
    NpDType(Rc<RefCell<NpDType>>),
}

/// Hostile pickles can nest containers a million deep; dropping them recursively would
/// overflow the stack, so children of uniquely owned containers are freed from a work list.
impl Drop for Value {
    fn drop(&mut self) {
        let mut work: Vec<Value> = Vec::new();
        take_children(self, &mut work);
        while let Some(mut v) = work.pop() {
            take_children(&mut v, &mut work);
        }
    }
}

fn take_children(v: &mut Value, work: &mut Vec<Value>) {
    match v {
        Value::Tuple(t) => {
            if let Some(items) = Rc::get_mut(t) {
                work.append(items);
            }
        }
        Value::List(l) => {
            if let Some(items) = Rc::get_mut(l) {
                work.append(items.get_mut());
            }
        }
        Value::Dict(d) => {
            if let Some(items) = Rc::get_mut(d) {
                for (k, x) in items.get_mut().drain(..) {
                    work.push(k);
                    work.push(x);
                }
            }
        }
        _ => {}
    }
}

impl Value {
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
            Value::NdArray(_) => "ndarray",
            Value::NpDType(_) => "dtype",
        }
    }

    pub fn is_tensor(&self) -> bool {
        matches!(self, Value::Tensor(_) | Value::NdArray(_))
    }

    fn items(&self) -> Option<Vec<Value>> {
        match self {
            Value::Tuple(t) => Some(t.as_ref().clone()),
            Value::List(l) => Some(l.borrow().clone()),
            _ => None,
        }
    }
}

/// Resolves a persistent id (torch's storage references) into a value.
pub type PersistentLoad<'a> = &'a mut dyn FnMut(Value) -> std::result::Result<Value, String>;

enum Fail {
    Unsafe(String),
    Bad(String),
}

type R<T> = std::result::Result<T, Fail>;

fn bad<T>(msg: impl Into<String>) -> R<T> {
    Err(Fail::Bad(msg.into()))
}

struct Machine<'a, 'p> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    persistent: Option<PersistentLoad<'p>>,
}

/// Runs one pickle starting at `start`; returns the value and the position after STOP.
pub fn unpickle(
    path: &Path,
    data: &[u8],
    start: usize,
    persistent: Option<PersistentLoad<'_>>,
) -> Result<(Value, usize)> {
    let mut m = Machine {
        data,
        pos: start,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        persistent,
    };
    match m.run() {
        Ok(v) => Ok((v, m.pos)),
        Err(Fail::Unsafe(msg)) => Err(Error::UnsafePickle {
            path: PathBuf::from(path),
            msg,
        }),
        Err(Fail::Bad(msg)) => Err(Error::weights(
            path,
            format!("malformed pickle at byte {}: {msg}", m.pos),
        )),
    }
}

impl Machine<'_, '_> {
    fn take(&mut self, n: usize) -> R<&[u8]> {
        if n > self.data.len() - self.pos {
            return bad(format!(
                "needs {n} bytes but only {} remain",
                self.data.len() - self.pos
            ));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> R<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn len_u32(&mut self) -> R<usize> {
        Ok(u32::from_le_bytes(self.le::<4>()?) as usize)
    }

    fn len_u64(&mut self) -> R<usize> {
        usize::try_from(u64::from_le_bytes(self.le::<8>()?))
            .or_else(|_| bad("length does not fit in memory"))
    }

    fn line(&mut self) -> R<String> {
        let rest = &self.data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return bad("unterminated text argument");
        };
        let s = String::from_utf8(rest[..n].to_vec()).or_else(|_| bad("non-UTF-8 text"))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn string(&mut self, n: usize) -> R<Value> {
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).or_else(|_| bad("invalid UTF-8 in a string"))?;
        Ok(Value::Str(Rc::from(s)))
    }

    fn bytes(&mut self, n: usize) -> R<Value> {
        Ok(Value::Bytes(Rc::from(self.take(n)?)))
    }

    fn pop(&mut self) -> R<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return bad("pop across a MARK");
        }
        self.stack.pop().map_or_else(|| bad("stack underflow"), Ok)
    }

    fn top(&mut self) -> R<&mut Value> {
        self.stack
            .last_mut()
            .map_or_else(|| bad("stack underflow"), Ok)
    }

    fn pop_mark(&mut self) -> R<Vec<Value>> {
        let Some(m) = self.marks.pop() else {
            return bad("no MARK on the stack");
        };
        if m > self.stack.len() {
            return bad("MARK above the stack");
        }
        Ok(self.stack.split_off(m))
    }

    fn global(&mut self, module: &str, name: &str) -> R<Value> {
        match lookup_global(module, name) {
            Some(g) => Ok(Value::Global(g)),
            None => Err(Fail::Unsafe(format!(
                "global `{module}.{name}` is not on the whitelist of tensor-rebuilding callables"
            ))),
        }
    }

    fn run(&mut self) -> R<Value> {
        loop {
            let op = self.u8()?;
            match op {
                opcode::PROTO => {
                    let p = self.u8()?;
                    if p > 5 {
                        return bad(format!("unsupported pickle protocol {p}"));
                    }
                }
                opcode::FRAME => {
                    self.le::<8>()?;
                }
                opcode::STOP => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                opcode::MARK => self.marks.push(self.stack.len()),
                opcode::POP => {
                    self.pop()?;
                }
                opcode::POP_MARK => {
                    self.pop_mark()?;
                }
                opcode::DUP => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                opcode::NONE => self.stack.push(Value::None),
                opcode::NEWTRUE => self.stack.push(Value::Bool(true)),
                opcode::NEWFALSE => self.stack.push(Value::Bool(false)),
                opcode::BININT => {
                    let v = i32::from_le_bytes(self.le::<4>()?);
                    self.stack.push(Value::Int(v as i64));
                }
                opcode::BININT1 => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                opcode::BININT2 => {
                    let v = u16::from_le_bytes(self.le::<2>()?);
                    self.stack.push(Value::Int(v as i64));
                }
                opcode::LONG1 | opcode::LONG4 => {
                    let n = if op == opcode::LONG1 {
                        self.u8()? as usize
                    } else {
                        self.len_u32()?
                    };
                    let b = self.take(n)?.to_vec();
                    self.stack.push(long_value(b));
                }
                opcode::BINFLOAT => {
                    let v = f64::from_be_bytes(self.le::<8>()?);
                    self.stack.push(Value::Float(v));
                }
                opcode::BINUNICODE => {
                    let n = self.len_u32()?;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                opcode::SHORT_BINUNICODE => {
                    let n = self.u8()? as usize;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                opcode::BINUNICODE8 => {
                    let n = self.len_u64()?;
                    let v = self.string(n)?;
                    self.stack.push(v);
                }
                // Python 2 byte strings: kept as bytes.
                opcode::BINSTRING => {
                    let n = self.len_u32()?;
                    let v = self.bytes(n)?;
                    self.stack.push(v);
                }
                opcode::SHORT_BINSTRING | opcode::SHORT_BINBYTES => {
                    let n = self.u8()? as usize;
                    let v = self.bytes(n)?;
                    self.stack.push(v);
                }
                opcode::BINBYTES => {
                    let n = self.len_u32()?;
                    let v = self.bytes(n)?;
                    self.stack.push(v);
                }
                opcode::BINBYTES8 | opcode::BYTEARRAY8 => {
                    let n = self.len_u64()?;
                    let v = self.bytes(n)?;
                    self.stack.push(v);
                }
                opcode::READONLY_BUFFER => {}
                opcode::NEXT_BUFFER => {
                    return bad("out-of-band buffers (NEXT_BUFFER) are not supported")
                }
                opcode::EMPTY_TUPLE => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                opcode::TUPLE1..=opcode::TUPLE3 => {
                    let n = (op - opcode::TUPLE1 + 1) as usize;
                    if self.stack.len() < n {
                        return bad("stack underflow");
                    }
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                opcode::TUPLE => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                opcode::EMPTY_LIST => self
                    .stack
                    .push(Value::List(Rc::new(RefCell::new(Vec::new())))),
                opcode::LIST => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                opcode::EMPTY_DICT => self
                    .stack
                    .push(Value::Dict(Rc::new(RefCell::new(Vec::new())))),
                opcode::DICT => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items)?;
                    self.stack.push(Value::Dict(Rc::new(RefCell::new(pairs))));
                }
                // Sets only matter as containers here; they become lists.
                opcode::EMPTY_SET => self
                    .stack
                    .push(Value::List(Rc::new(RefCell::new(Vec::new())))),
                opcode::FROZENSET => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                opcode::APPEND => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                opcode::APPENDS | opcode::ADDITEMS => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                opcode::SETITEM => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![(k, v)])?;
                }
                opcode::SETITEMS => {
                    let items = self.pop_mark()?;
                    let p = pairs(items)?;
                    self.set_items(p)?;
                }
                opcode::BINPUT => {
                    let i = self.u8()? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                opcode::LONG_BINPUT => {
                    let i = u32::from_le_bytes(self.le::<4>()?);
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                opcode::MEMOIZE => {
                    let i = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                opcode::BINGET | opcode::LONG_BINGET => {
                    let i = if op == opcode::BINGET {
                        self.u8()? as u32
                    } else {
                        u32::from_le_bytes(self.le::<4>()?)
                    };
                    match self.memo.get(&i) {
                        Some(v) => self.stack.push(v.clone()),
                        None => return bad(format!("memo slot {i} is empty")),
                    }
                }
                opcode::GLOBAL => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(&module, &name)?;
                    self.stack.push(g);
                }
                opcode::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                        return bad("STACK_GLOBAL needs two strings");
                    };
                    let g = self.global(module, name)?;
                    self.stack.push(g);
                }
                opcode::REDUCE | opcode::NEWOBJ => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let Value::Global(g) = f else {
                        return bad(format!("call of a {} (not a callable)", f.kind()));
                    };
                    let Some(args) = args.items() else {
                        return bad("call arguments are not a tuple");
                    };
                    let v = call(g, args)?;
                    self.stack.push(v);
                }
                opcode::NEWOBJ_EX => {
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let empty_kw = matches!(&kwargs, Value::Dict(d) if d.borrow().is_empty());
                    let (Value::Global(g), Some(args), true) = (f, args.items(), empty_kw) else {
                        return bad("unsupported NEWOBJ_EX");
                    };
                    let v = call(g, args)?;
                    self.stack.push(v);
                }
                opcode::BUILD => {
                    let state = self.pop()?;
                    let obj = self.top()?.clone();
                    build(&obj, state)?;
                }
                opcode::BINPERSID => {
                    let pid = self.pop()?;
                    let Some(load) = self.persistent.as_mut() else {
                        return bad("persistent id in a pickle that is not a torch checkpoint");
                    };
                    let v = load(pid).map_err(Fail::Bad)?;
                    self.stack.push(v);
                }
                opcode::INST | opcode::OBJ => {
                    return Err(Fail::Unsafe(
                        "INST/OBJ opcodes (arbitrary class instantiation) are refused".into(),
                    ))
                }
                opcode::EXT1..=opcode::EXT4 => {
                    return Err(Fail::Unsafe(
                        "extension-registry globals (EXT1/2/4) are refused".into(),
                    ))
                }
                _ => return bad(format!("unsupported opcode 0x{op:02x} ({:?})", op as char)),
            }
        }
    }

    fn append(&mut self, items: Vec<Value>) -> R<()> {
        match self.top()? {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            v => bad(format!("APPEND to a {}", v.kind())),
        }
    }

    fn set_items(&mut self, items: Vec<(Value, Value)>) -> R<()> {
        match self.top()? {
            Value::Dict(d) => {
                d.borrow_mut().extend(items);
                Ok(())
            }
            v => bad(format!("SETITEM on a {}", v.kind())),
        }
    }
}

fn pairs(items: Vec<Value>) -> R<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        return bad("odd number of items for a dict");
    }
    let mut it = items.into_iter();
    let mut out = Vec::new();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// LONG1/LONG4 payload: little-endian two's complement.
fn long_value(b: Vec<u8>) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    if b.len() <= 8 {
        let neg = b[b.len() - 1] & 0x80 != 0;
        let mut a = [if neg { 0xff } else { 0 }; 8];
        a[..b.len()].copy_from_slice(&b);
        return Value::Int(i64::from_le_bytes(a));
    }
    Value::BigInt(b)
}

fn int_arg(v: &Value, what: &str) -> R<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::Bool(b) => Ok(*b as i64),
        _ => bad(format!("{what}: expected an int, got a {}", v.kind())),
    }
}

fn usize_arg(v: &Value, what: &str) -> R<usize> {
    let i = int_arg(v, what)?;
    usize::try_from(i).or_else(|_| bad(format!("{what}: negative value {i}")))
}

fn usize_list(v: &Value, what: &str) -> R<Vec<usize>> {
    let Some(items) = v.items() else {
        return bad(format!("{what}: expected a tuple, got a {}", v.kind()));
    };
    items.iter().map(|x| usize_arg(x, what)).collect()
}

fn str_arg<'v>(v: &'v Value, what: &str) -> R<&'v str> {
    match v {
        Value::Str(s) => Ok(s),
        _ => bad(format!("{what}: expected a str, got a {}", v.kind())),
    }
}

fn np_dtype_arg(v: &Value, what: &str) -> R<NpDType> {
    match v {
        Value::NpDType(d) => Ok(d.borrow().clone()),
        _ => bad(format!(
            "{what}: expected a numpy dtype, got a {}",
            v.kind()
        )),
    }
}

fn call(g: Global, args: Vec<Value>) -> R<Value> {
    let n = args.len();
    let need = |k: usize| -> R<()> {
        if n < k {
            bad(format!("{g:?} called with {n} arguments, needs {k}"))
        } else {
            Ok(())
        }
    };
    match g {
        Global::OrderedDict => {
            let mut d = Vec::new();
            if let Some(first) = args.first() {
                let Some(items) = first.items() else {
                    return bad("OrderedDict argument is not a list of pairs");
                };
                for it in items {
                    match it.items().as_deref() {
                        Some([k, v]) => d.push((k.clone(), v.clone())),
                        _ => return bad("OrderedDict item is not a pair"),
                    }
                }
            }
            Ok(Value::Dict(Rc::new(RefCell::new(d))))
        }
        Global::RebuildTensorV2 | Global::RebuildTensor => {
            need(4)?;
            let Value::Storage(storage) = &args[0] else {
                return bad(format!("tensor storage is a {}", args[0].kind()));
            };
            let size = usize_list(&args[2], "tensor size")?;
            let stride = usize_list(&args[3], "tensor stride")?;
            if size.len() != stride.len() {
                return bad("tensor size and stride have different lengths");
            }
            Ok(Value::Tensor(Rc::new(TorchTensor {
                storage: storage.clone(),
                offset: usize_arg(&args[1], "storage offset")?,
                size,
                stride,
            })))
        }
        Global::RebuildParameter | Global::RebuildParameterWithState => {
            need(1)?;
            match &args[0] {
                t @ Value::Tensor(_) => Ok(t.clone()),
                v => bad(format!("parameter data is a {}", v.kind())),
            }
        }
        Global::NpReconstruct => {
            need(1)?;
            if !matches!(args[0], Value::Global(Global::NpNdarray)) {
                return bad("numpy _reconstruct of something other than numpy.ndarray");
            }
            Ok(Value::NdArray(Rc::new(RefCell::new(NdArray::default()))))
        }
        Global::NpDtype => {
            need(1)?;
            let code = str_arg(&args[0], "numpy dtype")?.to_string();
            Ok(Value::NpDType(Rc::new(RefCell::new(NpDType {
                code,
                byteorder: "=".into(),
                compound: false,
            }))))
        }
        Global::NpScalar => {
            need(2)?;
            let dt = np_dtype_arg(&args[0], "numpy scalar")?;
            let Value::Bytes(b) = &args[1] else {
                return bad("numpy scalar payload is not bytes");
            };
            np_scalar(&dt, b)
        }
        Global::NpFrombuffer => {
            need(4)?;
            let Value::Bytes(b) = &args[0] else {
                return bad("numpy _frombuffer payload is not bytes");
            };
            let dt = np_dtype_arg(&args[1], "numpy _frombuffer")?;
            let shape = usize_list(&args[2], "numpy shape")?;
            let order = str_arg(&args[3], "numpy order")?;
            Ok(Value::NdArray(Rc::new(RefCell::new(NdArray {
                shape,
                dtype: Some(dt),
                fortran: order == "F",
                data: Some(b.clone()),
            }))))
        }
        Global::CodecsEncode => {
            need(2)?;
            let s = str_arg(&args[0], "_codecs.encode")?;
            let enc = str_arg(&args[1], "_codecs.encode")?;
            if !matches!(enc, "latin1" | "latin-1" | "iso-8859-1") {
                return bad(format!("_codecs.encode with encoding {enc:?}"));
            }
            let mut out = Vec::with_capacity(s.len());
            for c in s.chars() {
                match u8::try_from(c as u32) {
                    Ok(b) => out.push(b),
                    Err(_) => return bad("non-latin1 character in encoded bytes"),
                }
            }
            Ok(Value::Bytes(Rc::from(out)))
        }
        Global::Bytes if n == 0 => Ok(Value::Bytes(Rc::from(Vec::new()))),
        _ => bad(format!("{g:?} cannot be called with these arguments")),
    }
}

fn np_scalar(dt: &NpDType, b: &[u8]) -> R<Value> {
    let big = dt.byteorder == ">";
    let mut v = b.to_vec();
    if big {
        v.reverse();
    }
    let arr = |n: usize| -> R<[u8; 8]> {
        if v.len() != n {
            return bad(format!("numpy scalar {} with {} bytes", dt.code, v.len()));
        }
        let mut a = [0u8; 8];
        a[..n].copy_from_slice(&v);
        Ok(a)
    };
    Ok(match dt.code.as_str() {
        "f8" => Value::Float(f64::from_le_bytes(arr(8)?)),
        "f4" => Value::Float(f32::from_le_bytes(arr(4)?[..4].try_into().unwrap()) as f64),
        "i8" => Value::Int(i64::from_le_bytes(arr(8)?)),
        "i4" => Value::Int(i32::from_le_bytes(arr(4)?[..4].try_into().unwrap()) as i64),
        "u1" => Value::Int(arr(1)?[0] as i64),
        "b1" => Value::Bool(arr(1)?[0] != 0),
        c => return bad(format!("numpy scalar of dtype {c} is not supported")),
    })
}

fn build(obj: &Value, state: Value) -> R<()> {
    match obj {
        Value::NdArray(a) => {
            let Some(st) = state.items() else {
                return bad("ndarray state is not a tuple");
            };
            // (version, shape, dtype, is_fortran, data); version 0 pickles omit the version.
            let st = match st.len() {
                5 => &st[1..],
                4 => &st[..],
                n => return bad(format!("ndarray state with {n} items")),
            };
            let Value::Bytes(data) = &st[3] else {
                return bad(format!(
                    "ndarray data is a {} (object arrays are refused)",
                    st[3].kind()
                ));
            };
            let mut a = a.borrow_mut();
            a.shape = usize_list(&st[0], "ndarray shape")?;
            a.dtype = Some(np_dtype_arg(&st[1], "ndarray dtype")?);
            a.fortran = matches!(st[2], Value::Bool(true) | Value::Int(1));
            a.data = Some(data.clone());
            Ok(())
        }
        Value::NpDType(d) => {
            let Some(st) = state.items() else {
                return bad("dtype state is not a tuple");
            };
            if st.len() < 5 {
                return bad("dtype state too short");
            }
            let mut d = d.borrow_mut();
            d.byteorder = str_arg(&st[1], "dtype byte order")?.to_string();
            d.compound = !matches!(st[2], Value::None)
                || !matches!(st[3], Value::None)
                || !matches!(st[4], Value::None);
            Ok(())
        }
        // An OrderedDict's own attributes (torch's `_metadata`) carry no tensors.
        Value::Dict(_) => Ok(()),
        v => bad(format!("BUILD on a {}", v.kind())),
    }
}

//! A small bounds-checked flatbuffer reader.
//!
//! Used instead of the generated accessors: tar names and PAX values may be any bytes (e.g.
//! binary `security.capability` xattrs), which the Rust flatbuffers verifier would reject as
//! non-UTF-8 strings. Every read is checked, so malformed input gives an error, never a panic.
//! It does not bound how often one object is referenced: that is the decoder's job (see
//! `limits.rs`).

/// Little-endian scalars readable from a flatbuffer.
pub(crate) trait Scalar: Sized + Copy {
    const SIZE: usize;
    fn from_le(b: &[u8]) -> Self;
}

macro_rules! scalar {
    ($($t:ty),*) => {$(
        impl Scalar for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn from_le(b: &[u8]) -> Self {
                let mut a = [0u8; std::mem::size_of::<$t>()];
                a.copy_from_slice(b);
                <$t>::from_le_bytes(a)
            }
        }
    )*};
}
scalar!(i8, u16, i32, u32, i64);

pub(crate) fn read<T: Scalar>(buf: &[u8], pos: usize) -> Result<T, String> {
    pos.checked_add(T::SIZE)
        .and_then(|end| buf.get(pos..end))
        .map(T::from_le)
        .ok_or_else(|| format!("read of {} bytes at {pos} out of bounds", T::SIZE))
}

/// Follows the uoffset stored at `pos`.
pub(crate) fn follow(buf: &[u8], pos: usize) -> Result<usize, String> {
    let off: u32 = read(buf, pos)?;
    pos.checked_add(off as usize)
        .filter(|&p| p < buf.len())
        .ok_or_else(|| format!("offset at {pos} points outside the buffer"))
}

/// A table located in the buffer, with its vtable checked.
pub(crate) struct Table<'a> {
    buf: &'a [u8],
    pos: usize,
    vtable: usize,
    vtable_len: usize,
    object_len: usize,
}

impl<'a> Table<'a> {
    pub(crate) fn root(buf: &'a [u8]) -> Result<Self, String> {
        Table::at(buf, follow(buf, 0)?)
    }

    pub(crate) fn at(buf: &'a [u8], pos: usize) -> Result<Self, String> {
        let soff: i32 = read(buf, pos)?;
        let vtable = (pos as i64 - i64::from(soff)) as usize;
        if vtable >= buf.len() {
            return Err(format!("vtable of table at {pos} out of bounds"));
        }
        let vtable_len = usize::from(read::<u16>(buf, vtable)?);
        let object_len = usize::from(read::<u16>(buf, vtable + 2)?);
        if vtable_len < 4 || vtable_len % 2 != 0 || vtable + vtable_len > buf.len() {
            return Err(format!("bad vtable at {vtable}"));
        }
        if object_len < 4 || pos + object_len > buf.len() {
            return Err(format!("table at {pos} overruns the buffer"));
        }
        Ok(Table {
            buf,
            pos,
            vtable,
            vtable_len,
            object_len,
        })
    }

    /// Position of a field, if present.
    fn field(&self, slot: u16, size: usize) -> Result<Option<usize>, String> {
        let slot = usize::from(slot);
        if slot + 2 > self.vtable_len {
            return Ok(None);
        }
        let off = usize::from(read::<u16>(self.buf, self.vtable + slot)?);
        if off == 0 {
            return Ok(None);
        }
        if off + size > self.object_len {
            return Err(format!("field {slot} of table at {} overruns it", self.pos));
        }
        Ok(Some(self.pos + off))
    }

    pub(crate) fn scalar<T: Scalar>(&self, slot: u16, default: T) -> Result<T, String> {
        match self.field(slot, T::SIZE)? {
            Some(p) => read(self.buf, p),
            None => Ok(default),
        }
    }

    pub(crate) fn bytes(&self, slot: u16) -> Result<Option<&'a [u8]>, String> {
        match self.field(slot, 4)? {
            Some(p) => bytes_at(self.buf, follow(self.buf, p)?).map(Some),
            None => Ok(None),
        }
    }

    pub(crate) fn table(&self, slot: u16) -> Result<Option<Table<'a>>, String> {
        match self.field(slot, 4)? {
            Some(p) => Table::at(self.buf, follow(self.buf, p)?).map(Some),
            None => Ok(None),
        }
    }

    pub(crate) fn vector(&self, slot: u16) -> Result<Option<OffsetVector<'a>>, String> {
        let Some(p) = self.field(slot, 4)? else {
            return Ok(None);
        };
        let start = follow(self.buf, p)?;
        let len = read::<u32>(self.buf, start)? as usize;
        len.checked_mul(4)
            .and_then(|n| n.checked_add(start + 4))
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| format!("vector at {start} overruns the buffer"))?;
        Ok(Some(OffsetVector {
            buf: self.buf,
            start: start + 4,
            len,
        }))
    }
}

/// Length-prefixed bytes (a flatbuffer string or `[ubyte]`) at `pos`.
pub(crate) fn bytes_at(buf: &[u8], pos: usize) -> Result<&[u8], String> {
    let len = read::<u32>(buf, pos)? as usize;
    buf.get(pos + 4..)
        .and_then(|b| b.get(..len))
        .ok_or_else(|| format!("byte string at {pos} overruns the buffer"))
}

/// A vector of offsets (to tables or strings).
pub(crate) struct OffsetVector<'a> {
    buf: &'a [u8],
    start: usize,
    pub(crate) len: usize,
}

impl<'a> OffsetVector<'a> {
    pub(crate) fn table(&self, i: usize) -> Result<Table<'a>, String> {
        Table::at(self.buf, follow(self.buf, self.start + 4 * i)?)
    }

    pub(crate) fn bytes(&self, i: usize) -> Result<&'a [u8], String> {
        bytes_at(self.buf, follow(self.buf, self.start + 4 * i)?)
    }
}

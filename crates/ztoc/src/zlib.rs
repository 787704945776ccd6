//! A small safe wrapper over zlib's inflate C API (implemented in Rust by `libz-rs-sys`).
//!
//! `flate2` does not expose what gzip random access needs: stopping at deflate block
//! boundaries (`Z_BLOCK`), the bit position reported in `data_type`, `inflatePrime` and
//! `inflateSetDictionary`. This module is the only `unsafe` code of the crate: every call
//! passes pointers to buffers that live for the duration of the call, and the stream is boxed
//! because zlib keeps a pointer back to it in its internal state.

use libz_rs_sys as z;

/// Window bits: automatic gzip or zlib header detection, 32 KiB window.
pub(crate) const WINDOW_BITS_AUTO: i32 = 47;
/// Window bits: raw deflate, 32 KiB window.
pub(crate) const WINDOW_BITS_RAW: i32 = -15;

/// Result of one inflate call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// Progress was made (or input/output ran out); call again.
    Ok,
    /// The end of the deflate stream (and, for gzip, its trailer) was reached.
    StreamEnd,
    /// No progress was possible (needs more input or output space).
    BufError,
}

/// Error reported by zlib.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("zlib error {code}: {message}")]
pub struct ZlibError {
    /// zlib return code.
    pub code: i32,
    /// zlib's message, if it set one.
    pub message: String,
}

/// Bytes consumed, bytes produced and status of one [`Inflater::inflate`] call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Progress {
    pub consumed: usize,
    pub produced: usize,
    pub status: Status,
}

/// Flush mode of an inflate call.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Flush {
    /// Inflate as much as possible.
    None,
    /// Also stop at the end of the header and at every deflate block boundary.
    Block,
}

/// An inflate stream.
pub(crate) struct Inflater {
    strm: Box<z::z_stream>,
}

// SAFETY: the stream owns its state exclusively; nothing in it is tied to a thread.
unsafe impl Send for Inflater {}

impl Inflater {
    /// Creates a stream with the given window bits ([`WINDOW_BITS_AUTO`], [`WINDOW_BITS_RAW`]).
    pub(crate) fn new(window_bits: i32) -> Result<Self, ZlibError> {
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: strm is a valid, default-initialised z_stream; version and size are zlib's own.
        let rc = unsafe {
            z::inflateInit2_(
                strm.as_mut(),
                window_bits,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as i32,
            )
        };
        let mut this = Inflater { strm };
        this.check(rc)?;
        Ok(this)
    }

    fn check(&mut self, rc: i32) -> Result<i32, ZlibError> {
        if rc >= 0 {
            return Ok(rc);
        }
        let message = if self.strm.msg.is_null() {
            String::new()
        } else {
            // SAFETY: zlib sets msg to a static NUL-terminated string.
            unsafe { std::ffi::CStr::from_ptr(self.strm.msg) }
                .to_string_lossy()
                .into_owned()
        };
        Err(ZlibError { code: rc, message })
    }

    /// Inflates from `input` into `output`.
    pub(crate) fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        flush: Flush,
    ) -> Result<Progress, ZlibError> {
        let in_len = input.len().min(u32::MAX as usize);
        let out_len = output.len().min(u32::MAX as usize);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = in_len as u32;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = out_len as u32;
        let flush = match flush {
            Flush::None => z::Z_NO_FLUSH,
            Flush::Block => z::Z_BLOCK,
        };
        // SAFETY: next_in/next_out point into the borrowed slices, valid for the whole call.
        let rc = unsafe { z::inflate(self.strm.as_mut(), flush) };
        let consumed = in_len - self.strm.avail_in as usize;
        let produced = out_len - self.strm.avail_out as usize;
        self.strm.next_in = std::ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = std::ptr::null_mut();
        self.strm.avail_out = 0;
        let status = match rc {
            z::Z_OK => Status::Ok,
            z::Z_STREAM_END => Status::StreamEnd,
            z::Z_BUF_ERROR => Status::BufError,
            z::Z_NEED_DICT => {
                return Err(ZlibError {
                    code: rc,
                    message: "preset dictionary needed".into(),
                })
            }
            _ => {
                self.check(rc)?;
                return Err(ZlibError {
                    code: rc,
                    message: "unexpected return".into(),
                });
            }
        };
        Ok(Progress {
            consumed,
            produced,
            status,
        })
    }

    /// zlib's `data_type`: bits 0-2 unused bits of the last input byte, bit 6 set while in the
    /// last block, bit 7 set right after a block end or the header.
    pub(crate) fn data_type(&self) -> i32 {
        self.strm.data_type
    }

    /// Resets the stream for a new member with the given window bits.
    pub(crate) fn reset(&mut self, window_bits: i32) -> Result<(), ZlibError> {
        // SAFETY: the stream was initialised by inflateInit2_.
        let rc = unsafe { z::inflateReset2(self.strm.as_mut(), window_bits) };
        self.check(rc).map(|_| ())
    }

    /// Inserts `bits` (1..=7) bits of `value` into the input bit buffer.
    pub(crate) fn prime(&mut self, bits: u8, value: u8) -> Result<(), ZlibError> {
        // SAFETY: the stream was initialised by inflateInit2_.
        let rc = unsafe { z::inflatePrime(self.strm.as_mut(), i32::from(bits), i32::from(value)) };
        self.check(rc).map(|_| ())
    }

    /// Sets the sliding window (raw inflate only).
    pub(crate) fn set_dictionary(&mut self, dict: &[u8]) -> Result<(), ZlibError> {
        // SAFETY: dict is valid for the call; zlib copies it.
        let rc = unsafe {
            z::inflateSetDictionary(self.strm.as_mut(), dict.as_ptr(), dict.len() as u32)
        };
        self.check(rc).map(|_| ())
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised by inflateInit2_ and is ended once.
        unsafe {
            z::inflateEnd(self.strm.as_mut());
        }
    }
}

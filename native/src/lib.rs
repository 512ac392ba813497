//! The relay's optional compiled hot path, imported as `relay._native` (`make native`):
//! `RowReader` reads a pgoutput Insert tuple into an OutboxRecord and `MessageReader` a
//! table-less event message (relay/wal/decoder.py); `HeaderBuilder` makes a record's Kafka
//! headers (relay/sinks/kafka/sink.py). Without it the
//! relay runs the pure-Python versions, which give the same results.
//!
//! `RowReader` reads a tuple whose columns are all in binary form or null, in one pass. It
//! mirrors the pure-Python reader exactly, and like it returns None for any row it does not
//! read itself (a text or unchanged-TOAST column, a required column null, a short message, a
//! value it cannot convert): the caller then takes the general path, which handles every case
//! and says what is wrong. Conversions it does not know are done by the Python converter it is
//! given, so both readers build the same records. No state, no I/O, no acknowledgement logic:
//! correctness stays in the Python core.

use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDateTime, PyList, PyString, PyTuple, PyTzInfo, PyType};

// How a column's value becomes its record field (see `RowReader::new`).
const CALL: u8 = 0; // the Python converter
const BYTES: u8 = 1; // the bytes as they are
const TEXT: u8 = 2; // UTF-8 text
const JSONB: u8 = 3; // jsonb binary: version byte 1, then the JSON text, kept as bytes
const TIMESTAMP: u8 = 4; // microseconds since 2000-01-01 UTC; +-infinity is None
const UUID: u8 = 5; // 16 bytes, through the Python `uuid_from_int`

const PG_EPOCH_DAYS: i64 = 10_957; // 2000-01-01 in days since 1970-01-01
const MICROS_PER_DAY: i64 = 86_400_000_000;

struct Column {
    slot: i32, // the record field it fills, -1 for a column the record does not use
    code: u8,
    convert: PyObject,
}

/// Reads the rows of one version of the outbox table (one Relation message).
#[pyclass(frozen, module = "relay._native")]
struct RowReader {
    columns: Vec<Column>,
    required: Vec<bool>,   // per record field: a null column is not read here
    defaults: Vec<PyObject>, // per record field, for the fields no column fills
    record_type: PyObject,
    tuple_new: PyObject,
    uuids: UuidMaker,
    utc: PyObject,
}

/// Makes `uuid.UUID`s as outbox.ids does.
struct UuidMaker {
    uuid_from_int: PyObject,
    // (uuid.UUID, SafeUUID.unknown) when outbox.ids builds UUIDs by setting their slots (its
    // check passed on this Python); else None and `uuid_from_int` is called.
    fast: Option<(PyObject, PyObject)>,
    object_new: PyObject,
}

impl UuidMaker {
    fn new(py: Python<'_>, uuid_from_int: PyObject, fast: Option<(PyObject, PyObject)>)
        -> PyResult<Self> {
        let object_new = py.get_type::<pyo3::types::PyAny>().getattr("__new__")?.unbind();
        Ok(UuidMaker { uuid_from_int, fast, object_new })
    }

    fn make(&self, py: Python<'_>, value: u128) -> PyResult<PyObject> {
        let value = value.into_pyobject(py)?;
        match &self.fast {
            // outbox.ids._uuid_from_int_fast, without its Python frame: a bare UUID with its
            // two slots set, as uuid.UUID(int=...) would leave them.
            Some((uuid_type, unknown)) => {
                let made = self.object_new.call1(py, (uuid_type,))?;
                let made = made.bind(py);
                generic_setattr(made, intern!(py, "int"), value.as_any())?;
                generic_setattr(made, intern!(py, "is_safe"), unknown.bind(py))?;
                Ok(made.clone().unbind())
            }
            None => self.uuid_from_int.call1(py, (value,)),
        }
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `object.__setattr__`: UUID's own refuses (its instances are immutable).
fn generic_setattr(
    target: &Bound<'_, PyAny>, name: &Bound<'_, PyString>, value: &Bound<'_, PyAny>,
) -> PyResult<()> {
    // SAFETY: three live references held for the call; the function takes its own references.
    let status = unsafe {
        pyo3::ffi::PyObject_GenericSetAttr(target.as_ptr(), name.as_ptr(), value.as_ptr())
    };
    if status == 0 { Ok(()) } else { Err(PyErr::fetch(target.py())) }
}

impl RowReader {
    /// The field value of one column, or None when this reader does not read it (the caller
    /// then gives the row to the general path).
    fn convert(&self, py: Python<'_>, column: &Column, raw: &[u8]) -> PyResult<Option<PyObject>> {
        Ok(Some(match column.code {
            BYTES => PyBytes::new(py, raw).into_any().unbind(),
            TEXT => match std::str::from_utf8(raw) {
                Ok(text) => PyString::new(py, text).into_any().unbind(),
                Err(_) => return Ok(None),
            },
            JSONB => match raw.split_first() {
                Some((1, json)) => PyBytes::new(py, json).into_any().unbind(),
                _ => return Ok(None),
            },
            TIMESTAMP => {
                let Ok(bytes) = <[u8; 8]>::try_from(raw) else { return Ok(None) };
                let micros = i64::from_be_bytes(bytes);
                if micros == i64::MAX || micros == i64::MIN {
                    return Ok(Some(py.None()));
                }
                let days = micros.div_euclid(MICROS_PER_DAY) + PG_EPOCH_DAYS;
                let of_day = micros.rem_euclid(MICROS_PER_DAY);
                let (year, month, day) = civil_from_days(days);
                if !(1..=9999).contains(&year) {
                    return Ok(None); // out of datetime's range: the general path reports it
                }
                let seconds = of_day / 1_000_000;
                let tz = self.utc.bind(py).downcast::<PyTzInfo>()?;
                PyDateTime::new(
                    py, year as i32, month, day, (seconds / 3600) as u8,
                    ((seconds / 60) % 60) as u8, (seconds % 60) as u8,
                    (of_day % 1_000_000) as u32, Some(tz),
                )?
                .into_any()
                .unbind()
            }
            UUID => {
                let Ok(bytes) = <[u8; 16]>::try_from(raw) else { return Ok(None) };
                self.uuids.make(py, u128::from_be_bytes(bytes))?
            }
            _ => column.convert.call1(py, (PyBytes::new(py, raw),))?,
        }))
    }
}

#[pymethods]
impl RowReader {
    /// plan: per column of the table, (record field or -1, conversion code, converter).
    #[new]
    #[pyo3(signature = (plan, required, defaults, record_type, tuple_new, uuid_from_int, utc,
                        uuid_fast=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        plan: Vec<(i32, u8, PyObject)>,
        required: Vec<bool>,
        defaults: Vec<PyObject>,
        record_type: PyObject,
        tuple_new: PyObject,
        uuid_from_int: PyObject,
        utc: PyObject,
        uuid_fast: Option<(PyObject, PyObject)>,
    ) -> PyResult<Self> {
        let uuids = UuidMaker::new(py, uuid_from_int, uuid_fast)?;
        if required.len() != defaults.len() {
            return Err(PyValueError::new_err("required and defaults differ in length"));
        }
        let mut columns = Vec::with_capacity(plan.len());
        for (slot, code, convert) in plan {
            if slot >= defaults.len() as i32 || code > UUID {
                return Err(PyValueError::new_err(format!("bad column plan ({slot}, {code})")));
            }
            columns.push(Column { slot, code, convert });
        }
        Ok(RowReader { columns, required, defaults, record_type, tuple_new, uuids, utc })
    }

    /// The record of the tuple at `offset` of an Insert message, or None (see the module doc).
    fn read(&self, py: Python<'_>, data: &[u8], offset: usize) -> PyResult<Option<PyObject>> {
        let mut at = offset;
        if data.len() < at + 2 || usize::from(u16::from_be_bytes([data[at], data[at + 1]]))
            != self.columns.len()
        {
            return Ok(None);
        }
        at += 2;
        let mut values: Vec<Option<PyObject>> = (0..self.defaults.len()).map(|_| None).collect();
        for column in &self.columns {
            match data.get(at) {
                Some(b'b') => {
                    let Some(length) = data.get(at + 1..at + 5) else { return Ok(None) };
                    let length = u32::from_be_bytes(length.try_into().unwrap()) as usize;
                    let start = at + 5;
                    let Some(raw) = data.get(start..start + length) else { return Ok(None) };
                    at = start + length;
                    if column.slot >= 0 {
                        match self.convert(py, column, raw)? {
                            Some(value) => values[column.slot as usize] = Some(value),
                            None => return Ok(None),
                        }
                    }
                }
                Some(b'n') if column.slot < 0 || !self.required[column.slot as usize] => at += 1,
                _ => return Ok(None),
            }
        }
        let fields = values
            .into_iter()
            .zip(&self.defaults)
            .map(|(value, default)| value.unwrap_or_else(|| default.clone_ref(py)));
        let fields = PyTuple::new(py, fields)?;
        Ok(Some(self.tuple_new.call1(py, (&self.record_type, fields))?))
    }
}

/// A cursor over a table-less message's JSON header, for the one shape the writer produces
/// (`OutboxRecord.encode_message`: compact, keys in its order, strings without escapes).
struct Shape<'a> {
    text: &'a [u8],
    at: usize,
}

impl<'a> Shape<'a> {
    fn literal(&mut self, expected: &[u8]) -> Option<()> {
        let end = self.at + expected.len();
        (self.text.get(self.at..end)? == expected).then(|| self.at = end)
    }

    /// The text of a JSON string whose opening quote was just read: no escape, no control
    /// character (JSON forbids them raw), valid UTF-8; else None.
    fn string(&mut self) -> Option<&'a str> {
        let start = self.at;
        let length = self.text.get(start..)?.iter().position(|&b| b == b'"')?;
        let raw = &self.text[start..start + length];
        if raw.iter().any(|&b| b == b'\\' || b < 0x20) {
            return None;
        }
        self.at = start + length + 1;
        std::str::from_utf8(raw).ok()
    }

    fn non_empty(&mut self, key: &[u8]) -> Option<&'a str> {
        self.literal(key)?;
        self.string().filter(|text| !text.is_empty())
    }

    /// `null` or a string.
    fn optional(&mut self, key: &[u8]) -> Option<Option<&'a str>> {
        self.literal(key)?;
        if self.literal(b"null").is_some() {
            return Some(None);
        }
        self.literal(b"\"")?;
        Some(Some(self.string()?))
    }
}

/// The canonical 8-4-4-4-12 text of a UUID, hex digits of either case.
fn uuid_from_text(text: &str) -> Option<u128> {
    let bytes = text.as_bytes();
    if bytes.len() != 36 {
        return None;
    }
    let mut value: u128 = 0;
    for (at, &b) in bytes.iter().enumerate() {
        if matches!(at, 8 | 13 | 18 | 23) {
            if b != b'-' {
                return None;
            }
            continue;
        }
        value = (value << 4) | u128::from((b as char).to_digit(16)?);
    }
    Some(value)
}

fn digits(text: &[u8]) -> Option<u32> {
    text.iter().try_fold(0u32, |n, &b| b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0')))
}

/// `YYYY-MM-DDTHH:MM:SS[.ffffff]+00:00`, as `datetime.isoformat()` writes a UTC time.
fn utc_iso(text: &str) -> Option<(i32, u8, u8, u8, u8, u8, u32)> {
    let b = text.as_bytes();
    let rest = b.strip_suffix(b"+00:00")?;
    let (main, micros) = match rest.len() {
        19 => (rest, 0),
        26 if rest[19] == b'.' => (&rest[..19], digits(&rest[20..])?),
        _ => return None,
    };
    if main[4] != b'-' || main[7] != b'-' || main[10] != b'T' || main[13] != b':'
        || main[16] != b':' {
        return None;
    }
    Some((digits(&main[..4])? as i32, digits(&main[5..7])? as u8, digits(&main[8..10])? as u8,
          digits(&main[11..13])? as u8, digits(&main[14..16])? as u8,
          digits(&main[17..19])? as u8, micros))
}

/// Reads table-less events (outbox/record.py `decode_message`) of the shape the writer makes;
/// None for anything else, which the Python decoder then reads or rejects with its reason.
#[pyclass(frozen, module = "relay._native")]
struct MessageReader {
    record_type: PyObject,
    tuple_new: PyObject,
    no_headers: PyObject,
    uuids: UuidMaker,
    utc: PyObject,
}

#[pymethods]
impl MessageReader {
    #[new]
    #[pyo3(signature = (record_type, tuple_new, no_headers, uuid_from_int, utc, uuid_fast=None))]
    fn new(
        py: Python<'_>,
        record_type: PyObject,
        tuple_new: PyObject,
        no_headers: PyObject,
        uuid_from_int: PyObject,
        utc: PyObject,
        uuid_fast: Option<(PyObject, PyObject)>,
    ) -> PyResult<Self> {
        let uuids = UuidMaker::new(py, uuid_from_int, uuid_fast)?;
        Ok(MessageReader { record_type, tuple_new, no_headers, uuids, utc })
    }

    fn read(&self, py: Python<'_>, content: &[u8]) -> PyResult<Option<PyObject>> {
        if content.len() < 5 || content[0] != 1 {
            return Ok(None);
        }
        let length = u32::from_be_bytes([content[1], content[2], content[3], content[4]]);
        let end = 5 + length as usize;
        let Some(header) = content.get(5..end) else { return Ok(None) };
        let mut shape = Shape { text: header, at: 0 };
        let fields = (|| {
            shape.literal(b"{\"id\":\"")?;
            let id = uuid_from_text(shape.string()?)?;
            let aggregate_type = shape.non_empty(b",\"aggregate_type\":\"")?;
            let aggregate_id = shape.non_empty(b",\"aggregate_id\":\"")?;
            let event_type = shape.non_empty(b",\"event_type\":\"")?;
            let topic = shape.optional(b",\"topic\":")?;
            let content_type = shape.non_empty(b",\"content_type\":\"")?;
            shape.literal(b",\"headers\":{}")?;
            let created = shape.optional(b",\"created_at\":")?;
            shape.literal(b"}")?;
            (shape.at == header.len()).then_some(())?;
            let created = match created {
                None | Some("") => None,
                Some(text) => Some(utc_iso(text)?),
            };
            Some((id, aggregate_type, aggregate_id, event_type, topic, content_type, created))
        })();
        let Some((id, aggregate_type, aggregate_id, event_type, topic, content_type, created)) =
            fields else { return Ok(None) };
        let created_at = match created {
            None => py.None(),
            Some((year, month, day, hour, minute, second, micros)) => {
                let tz = self.utc.bind(py).downcast::<PyTzInfo>()?;
                match PyDateTime::new(py, year, month, day, hour, minute, second, micros,
                                      Some(tz)) {
                    Ok(made) => made.into_any().unbind(),
                    Err(_) => return Ok(None), // not a date: the Python decoder says so
                }
            }
        };
        let id = self.uuids.make(py, id)?;
        let topic = match topic {
            None => py.None(),
            Some(text) => PyString::new(py, text).into_any().unbind(),
        };
        let fields: [PyObject; 9] = [
            id,
            PyString::new(py, aggregate_type).into_any().unbind(),
            PyString::new(py, aggregate_id).into_any().unbind(),
            PyString::new(py, event_type).into_any().unbind(),
            PyBytes::new(py, &content[end..]).into_any().unbind(),
            PyString::new(py, content_type).into_any().unbind(),
            self.no_headers.clone_ref(py),
            topic,
            created_at,
        ];
        let fields = PyTuple::new(py, fields)?;
        Ok(Some(self.tuple_new.call1(py, (&self.record_type, fields))?))
    }
}

/// The Kafka headers of an outbox record (relay/sinks/kafka/sink.py `kafka_headers`): the four
/// reserved ones, then the record's own except those names. The id's text is made here from
/// the UUID's integer (the same 8-4-4-4-12 lower-case form as `str(uuid)`), for a `uuid.UUID`
/// exactly; any other id is turned into text by its own `str`.
#[pyclass(frozen, module = "relay._native")]
struct HeaderBuilder {
    uuid_type: Py<PyType>,
    names: [Py<PyString>; 4],
    // The record's fields holding id, event_type, aggregate_type, content_type, headers.
    fields: [usize; 5],
}

/// 8-4-4-4-12 lower-case hex digits, as `str(uuid.UUID)` writes them.
fn uuid_text(value: u128) -> [u8; 36] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'-'; 36];
    let mut nibble = 32;
    for (at, byte) in out.iter_mut().enumerate() {
        if matches!(at, 8 | 13 | 18 | 23) {
            continue;
        }
        nibble -= 1;
        *byte = DIGITS[((value >> (nibble * 4)) & 0xF) as usize];
    }
    out
}

#[pymethods]
impl HeaderBuilder {
    #[new]
    fn new(py: Python<'_>, uuid_type: Py<PyType>, fields: [usize; 5]) -> Self {
        let names = ["id", "event_type", "aggregate_type", "content_type"]
            .map(|name| PyString::intern(py, name).unbind());
        HeaderBuilder { uuid_type, names, fields }
    }

    fn __call__<'py>(&self, py: Python<'py>, record: &Bound<'py, PyTuple>)
        -> PyResult<Bound<'py, PyList>> {
        let [id_at, event_type_at, aggregate_type_at, content_type_at, headers_at] = self.fields;
        let id = record.get_item(id_at)?;
        let id_text = if id.get_type().is(self.uuid_type.bind(py)) {
            let text = uuid_text(id.getattr(intern!(py, "int"))?.extract::<u128>()?);
            // Only ASCII hex digits and dashes were written.
            PyString::new(py, std::str::from_utf8(&text).expect("ascii")).into_any()
        } else {
            id.str()?.into_any()
        };
        let values = [id_text, record.get_item(event_type_at)?,
                      record.get_item(aggregate_type_at)?, record.get_item(content_type_at)?];
        let mut reserved = Vec::with_capacity(4);
        for (name, value) in self.names.iter().zip(values) {
            reserved.push(PyTuple::new(py, [name.bind(py).clone().into_any(), value])?);
        }
        let headers = PyList::new(py, reserved)?;
        let own = record.get_item(headers_at)?;
        if own.is_truthy()? {
            'items: for item in own.call_method0("items")?.try_iter()? {
                let item = item?;
                let key = item.get_item(0)?;
                for name in &self.names {
                    if key.eq(name.bind(py))? {
                        continue 'items;
                    }
                }
                headers.append(PyTuple::new(py, [key, item.get_item(1)?])?)?;
            }
        }
        Ok(headers)
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<RowReader>()?;
    m.add_class::<HeaderBuilder>()?;
    m.add_class::<MessageReader>()?;
    m.add("TEXT", TEXT)?;
    m.add("CALL", CALL)?;
    m.add("BYTES", BYTES)?;
    m.add("JSONB", JSONB)?;
    m.add("TIMESTAMP", TIMESTAMP)?;
    m.add("UUID", UUID)?;
    Ok(())
}

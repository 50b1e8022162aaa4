//! What names a record: an id is text, and one record must have one text in
//! every session. Coalescing, the claim's exclusion of a record in flight and
//! the order of deliveries all compare ids as text; an id spelled two ways
//! (a `timestamptz` key under two TimeZones, a float under two
//! extra_float_digits) would be two records, and a stale state could land
//! last.
//!
//! So a tracked key column must be of a type whose text output depends on no
//! setting. `enqueue(kind, 7)` and `enqueue(kind, '7')` are one record
//! because both give the text `7`, as a tracked integer key does.

use crate::pg::errors::raise;
use pgrx::pg_sys::{self, BuiltinOid as T};
use pgrx::prelude::*;
use pgrx::FromDatum;

/// Longest id accepted, in bytes.
const MAX_ID_LEN: usize = 1024;

/// Whether `id` can name a record: not empty, at most [`MAX_ID_LEN`] bytes.
pub fn is_valid(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN
}

/// Raises unless `id` names a record: not empty, at most [`MAX_ID_LEN`]
/// bytes (an id is a key, not data).
pub fn check_id(id: &str) {
    if id.is_empty() {
        raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "id must not be empty", None);
    }
    if id.len() > MAX_ID_LEN {
        raise(
            PgSqlErrorCode::ERRCODE_STRING_DATA_RIGHT_TRUNCATION,
            format!("id is {} bytes long; the limit is {MAX_ID_LEN}", id.len()),
            Some("Enqueue the record's key, not its data."),
        );
    }
}

/// Types whose output function reads no setting: integers, exact numbers,
/// strings, uuids, booleans and network addresses.
const CANONICAL: &[T] = &[
    T::INT2OID,
    T::INT4OID,
    T::INT8OID,
    T::OIDOID,
    T::NUMERICOID,
    T::TEXTOID,
    T::VARCHAROID,
    T::BPCHAROID,
    T::NAMEOID,
    T::CHAROID,
    T::UUIDOID,
    T::BOOLOID,
    T::INETOID,
    T::CIDROID,
    T::MACADDROID,
    T::MACADDR8OID,
];

/// Whether every session prints values of type `typid` alike (a domain as
/// its base type; an enum by its labels).
fn is_canonical(typid: pg_sys::Oid) -> bool {
    let listed = |typid: pg_sys::Oid| CANONICAL.iter().any(|t| pg_sys::Oid::from(*t) == typid);
    if listed(typid) {
        return true;
    }
    // SAFETY: syscache lookups of a type; both take any oid.
    let (base, is_enum) = unsafe {
        let base = pg_sys::getBaseType(typid);
        (base, pg_sys::type_is_enum(base))
    };
    listed(base) || is_enum
}

/// The id an `enqueue` argument names: its type's text output, as a
/// tracked key column of that type gives it. Raises 0A000 for a type whose
/// text depends on session settings.
pub fn text_of(value: pgrx::AnyElement) -> String {
    let typid = value.oid();
    if typid == pg_sys::TEXTOID {
        // SAFETY: a non-null datum of type text.
        return unsafe { String::from_polymorphic_datum(value.datum(), false, typid) }.expect("a non-null text");
    }
    if !is_canonical(typid) {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("an id of type {} has a text that depends on session settings", type_name(typid)),
            Some(
                "Dates, times, intervals, floats, bytea and money print differently under another DateStyle, TimeZone, \
                 IntervalStyle, extra_float_digits, bytea_output or lc_monetary, so one record would get two ids. \
                 Pass the record's key as an integer, numeric, text or uuid.",
            ),
        );
    }
    // SAFETY: the type's output function takes a non-null datum of the type
    // and returns a palloc'd C string.
    unsafe {
        let mut output = pg_sys::InvalidOid;
        let mut varlena = false;
        pg_sys::getTypeOutputInfo(typid, &mut output, &mut varlena);
        let cstr = pg_sys::OidOutputFunctionCall(output, value.datum());
        std::ffi::CStr::from_ptr(cstr).to_string_lossy().into_owned()
    }
}

fn type_name(typid: pg_sys::Oid) -> String {
    // SAFETY: format_type_be names any type oid (or says it is unknown).
    unsafe { std::ffi::CStr::from_ptr(pg_sys::format_type_be(typid)) }.to_string_lossy().into_owned()
}

/// Raises 0A000 unless a key column `column` of type `typid` names each
/// record with one text in every session.
pub fn require_canonical(column: &str, typid: pg_sys::Oid) {
    if is_canonical(typid) {
        return;
    }
    let name = type_name(typid);
    raise(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        format!("the id column \"{column}\" is of type {name}, whose text depends on session settings"),
        Some(
            "Dates, times, intervals, floats, bytea and money print differently under another DateStyle, TimeZone, \
             IntervalStyle, extra_float_digits, bytea_output or lc_monetary, so one record would get two ids. \
             Track a key of an integer, numeric, text or uuid type.",
        ),
    );
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use crate::testing::sqlstate_of;
    use pgrx::prelude::*;

    #[pg_test]
    fn keys_that_print_alike_everywhere_are_tracked_and_others_refused() {
        Spi::run("SELECT outbox.register('keyed', 'http://h/{id}')").unwrap();
        Spi::run("CREATE TYPE public.mood AS ENUM ('ok', 'sad'); CREATE DOMAIN public.code AS text").unwrap();
        for typ in ["int", "bigint", "smallint", "numeric", "text", "varchar(20)", "uuid", "public.mood", "public.code"] {
            Spi::run(&format!("CREATE TABLE public.k_ok (id {typ} PRIMARY KEY)")).unwrap();
            assert_eq!(sqlstate_of("SELECT outbox.track('public.k_ok', 'keyed')"), "00000", "{typ}");
            Spi::run("DROP TABLE public.k_ok").unwrap();
        }
        for typ in ["timestamptz", "timestamp", "date", "time", "interval", "float8", "real", "bytea", "money"] {
            Spi::run(&format!("CREATE TABLE public.k_bad (id {typ} PRIMARY KEY)")).unwrap();
            assert_eq!(sqlstate_of("SELECT outbox.track('public.k_bad', 'keyed')"), "0A000", "{typ}");
            Spi::run("DROP TABLE public.k_bad").unwrap();
        }
        let msg = crate::testing::error_of(
            "CREATE TABLE public.k_bad (id timestamptz PRIMARY KEY); SELECT outbox.track('public.k_bad', 'keyed')",
        )
        .unwrap();
        assert!(msg.contains("depends on session settings"), "{msg}");
    }

    /// A key column changed to such a type after `track` is refused by the
    /// trigger itself, before a change is recorded under a loose id.
    #[pg_test]
    fn the_trigger_refuses_a_key_altered_to_such_a_type() {
        Spi::run("SELECT outbox.register('keyed', 'http://h/{id}')").unwrap();
        Spi::run("CREATE TABLE public.k (id text PRIMARY KEY); SELECT outbox.track('public.k', 'keyed')").unwrap();
        Spi::run("INSERT INTO public.k VALUES ('2024-01-01')").unwrap();
        Spi::run("ALTER TABLE public.k ALTER COLUMN id TYPE date USING id::date").unwrap();
        assert_eq!(sqlstate_of("INSERT INTO public.k VALUES ('2024-01-02')"), "0A000");
        assert_eq!(sqlstate_of("TRUNCATE public.k"), "0A000");
    }

    /// 7, '7' and a tracked bigint key of 7 are one record; so are a uuid
    /// key and its text.
    #[pg_test]
    fn one_record_has_one_id_however_it_is_named() {
        Spi::run("SELECT outbox.register('keyed', 'http://h/{id}')").unwrap();
        Spi::run("CREATE TABLE public.kb (id bigint PRIMARY KEY); SELECT outbox.track('public.kb', 'keyed')").unwrap();
        Spi::run("CREATE TABLE public.ku (id uuid PRIMARY KEY); SELECT outbox.track('public.ku', 'keyed')").unwrap();
        Spi::run("SET LOCAL extra_float_digits = 3; SET LOCAL DateStyle = 'German'").unwrap();
        Spi::run("INSERT INTO public.kb VALUES (7)").unwrap();
        Spi::run("SELECT outbox.enqueue('keyed', 7), outbox.enqueue('keyed', '7'), outbox.enqueue('keyed', 7::bigint), outbox.enqueue('keyed', 7::smallint, '0 s'), outbox.enqueue('keyed', 7::numeric), outbox.enqueue('keyed', '7'::varchar)").unwrap();
        let u = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        Spi::run(&format!("INSERT INTO public.ku VALUES ('{}')", u.to_uppercase())).unwrap();
        Spi::run(&format!("SELECT outbox.enqueue('keyed', '{u}'::uuid), outbox.enqueue('keyed', '{u}')")).unwrap();
        let ids = crate::testing::texts("SELECT id FROM outbox.jobs WHERE kind = 'keyed' ORDER BY id", &[]);
        assert_eq!(ids, ["7", u]);
    }
}

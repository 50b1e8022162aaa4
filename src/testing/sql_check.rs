//! A lint for the SQL the extension runs: every function call and every
//! operator names its schema, so that nothing a role creates can stand in
//! for a built-in, whatever the search_path (DESIGN.md, "Security").
//!
//! [`unqualified`] lexes a statement as Postgres does (string literals,
//! `E''` strings, dollar quotes, quoted identifiers, comments, `$n`
//! parameters, numbers) and reports:
//! 1. a function call without a `schema.` in front of its name;
//! 2. an operator outside `OPERATOR(schema.op)`;
//! 3. syntax that looks an operator up by name: `IN (...)`, `NOT IN`,
//!    `BETWEEN`, `LIKE`, `ILIKE`, `SIMILAR TO`, `IS [NOT] DISTINCT FROM`,
//!    `NULLIF` and a simple `CASE x WHEN`.
//!
//! The body of a dollar-quoted string (a function's body) is checked as SQL
//! too. Pure Rust, no Postgres: the modules' unit tests run their statements
//! through [`assert_qualified`].

/// Postgres' reserved keywords: none can name a function unquoted, so a
/// `(` after one is syntax, and none is a column unless after a `.`.
#[rustfmt::skip]
const RESERVED: &[&str] = &[
    "ALL", "ANALYSE", "ANALYZE", "AND", "ANY", "ARRAY", "AS", "ASC", "ASYMMETRIC", "BOTH", "CASE", "CAST", "CHECK",
    "COLLATE", "COLUMN", "CONSTRAINT", "CREATE", "CURRENT_CATALOG", "CURRENT_DATE", "CURRENT_ROLE", "CURRENT_TIME",
    "CURRENT_TIMESTAMP", "CURRENT_USER", "DEFAULT", "DEFERRABLE", "DESC", "DISTINCT", "DO", "ELSE", "END", "EXCEPT",
    "FALSE", "FETCH", "FOR", "FOREIGN", "FROM", "GRANT", "GROUP", "HAVING", "IN", "INITIALLY", "INTERSECT", "INTO",
    "LATERAL", "LEADING", "LIMIT", "LOCALTIME", "LOCALTIMESTAMP", "NOT", "NULL", "OFFSET", "ON", "ONLY", "OR", "ORDER",
    "PLACING", "PRIMARY", "REFERENCES", "RETURNING", "SELECT", "SESSION_USER", "SOME", "SYMMETRIC", "SYSTEM_USER",
    "TABLE", "THEN", "TO", "TRAILING", "TRUE", "UNION", "UNIQUE", "USER", "USING", "VARIADIC", "WHEN", "WHERE",
    "WINDOW", "WITH",
];

/// Column-name keywords whose parenthesised forms the grammar turns into
/// nodes or into calls of `pg_catalog` functions (`extract`, `trim`,
/// `position`, ...), or that are types with a modifier (`numeric(10, 2)`):
/// a `(` after one is syntax. (They can still name a column.) `substring`
/// and `overlay` are not here: their plain argument-list forms look the
/// function up through the search_path (see [`keyword_form`]); nor is
/// `nullif`, which looks `=` up by name.
#[rustfmt::skip]
const COLUMN_NAME_SYNTAX: &[&str] = &[
    "BIGINT", "BIT", "BOOLEAN", "CHAR", "CHARACTER", "COALESCE", "DEC", "DECIMAL", "EXISTS", "EXTRACT", "FLOAT",
    "GREATEST", "INT", "INTEGER", "INTERVAL", "LEAST", "NUMERIC", "POSITION", "PRECISION", "REAL", "ROW", "SMALLINT",
    "TIME", "TIMESTAMP", "TREAT", "TRIM", "VALUES", "VARCHAR",
];

fn paren_syntax(t: &Tok<'_>) -> bool {
    t.is_any(RESERVED) || t.is_any(COLUMN_NAME_SYNTAX)
}

/// Reserved keywords that stand for a value: an operator after one is binary.
#[rustfmt::skip]
const VALUE_KEYWORDS: &[&str] = &[
    "CURRENT_CATALOG", "CURRENT_DATE", "CURRENT_ROLE", "CURRENT_TIME", "CURRENT_TIMESTAMP", "CURRENT_USER", "END",
    "FALSE", "LOCALTIME", "LOCALTIMESTAMP", "NULL", "SESSION_USER", "SYSTEM_USER", "TRUE", "USER",
];

/// Options of PL/pgSQL's `RAISE ... USING option = expr`.
const RAISE_OPTIONS: &[&str] =
    &["MESSAGE", "DETAIL", "HINT", "ERRCODE", "COLUMN", "CONSTRAINT", "DATATYPE", "TABLE", "SCHEMA"];

/// Where a `SET` clause ends (at its own parenthesis depth).
const SET_CLAUSE_ENDS: &[&str] = &["WHERE", "FROM", "RETURNING", "SELECT", "VALUES", "USING"];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// An unquoted identifier or keyword.
    Word,
    /// A "quoted identifier".
    Quoted,
    /// A string literal.
    Str,
    /// A dollar-quoted string; the token's text is its body.
    Dollar,
    Param,
    Num,
    Op,
    /// `::`
    Cast,
    /// `:=`
    ColonEq,
    /// `=>`, a named argument.
    Arrow,
    /// One of `( ) [ ] , ; . :`.
    Punct,
}

#[derive(Clone, Copy, Debug)]
struct Tok<'a> {
    kind: Kind,
    text: &'a str,
    at: usize,
}

impl Tok<'_> {
    fn is(&self, word: &str) -> bool {
        self.kind == Kind::Word && self.text.eq_ignore_ascii_case(word)
    }

    fn is_any(&self, words: &[&str]) -> bool {
        self.kind == Kind::Word && words.iter().any(|w| self.text.eq_ignore_ascii_case(w))
    }

    fn punct(&self, p: &str) -> bool {
        self.kind == Kind::Punct && self.text == p
    }
}

fn is_op_char(c: u8) -> bool {
    b"+-*/<>=~!@#%^&|`?".contains(&c)
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_char(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// The end of the string literal whose opening quote is at `i`; with
/// `backslashes`, a backslash escapes the next byte (`E''`).
fn string_end(b: &[u8], mut i: usize, backslashes: bool) -> Result<usize, String> {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' if backslashes => i += 2,
            b'\'' if b.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err("unterminated string literal".into())
}

fn quoted_end(b: &[u8], mut i: usize) -> Result<usize, String> {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'"' if b.get(i + 1) == Some(&b'"') => i += 2,
            b'"' => return Ok(i + 1),
            _ => i += 1,
        }
    }
    Err("unterminated quoted identifier".into())
}

fn lex(sql: &str) -> Result<Vec<Tok<'_>>, String> {
    let b = sql.as_bytes();
    let mut toks: Vec<Tok<'_>> = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
        } else if b[i..].starts_with(b"--") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            // Block comments nest.
            let mut depth = 0;
            loop {
                if i >= b.len() {
                    return Err(format!("unterminated comment at byte {start}"));
                }
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == b'\'' {
            i = string_end(b, i, false)?;
            toks.push(Tok { kind: Kind::Str, text: &sql[start..i], at: start });
        } else if c == b'"' {
            i = quoted_end(b, i)?;
            toks.push(Tok { kind: Kind::Quoted, text: &sql[start + 1..i - 1], at: start });
        } else if c == b'$' {
            if b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                toks.push(Tok { kind: Kind::Param, text: &sql[start..i], at: start });
            } else {
                let mut j = i + 1;
                if j < b.len() && is_ident_start(b[j]) {
                    while j < b.len() && is_ident_char(b[j]) && b[j] != b'$' {
                        j += 1;
                    }
                }
                if b.get(j) != Some(&b'$') {
                    return Err(format!("stray $ at byte {start}"));
                }
                let tag = &sql[i..=j];
                let body = j + 1;
                let Some(len) = sql[body..].find(tag) else {
                    return Err(format!("unterminated dollar quote {tag} at byte {start}"));
                };
                toks.push(Tok { kind: Kind::Dollar, text: &sql[body..body + len], at: start });
                i = body + len + tag.len();
            }
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            if c == b'0' && b.get(i + 1).is_some_and(|x| b"xXoObB".contains(x)) {
                i += 2;
                while i < b.len() && (b[i].is_ascii_hexdigit() || b[i] == b'_') {
                    i += 1;
                }
            } else {
                while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'_') {
                    i += 1;
                }
                if b.get(i) == Some(&b'.') && b.get(i + 1) != Some(&b'.') {
                    i += 1;
                    while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'_') {
                        i += 1;
                    }
                }
                if b.get(i).is_some_and(|x| *x == b'e' || *x == b'E') {
                    let mut j = i + 1;
                    if b.get(j).is_some_and(|x| *x == b'+' || *x == b'-') {
                        j += 1;
                    }
                    if b.get(j).is_some_and(u8::is_ascii_digit) {
                        i = j;
                        while i < b.len() && b[i].is_ascii_digit() {
                            i += 1;
                        }
                    }
                }
            }
            toks.push(Tok { kind: Kind::Num, text: &sql[start..i], at: start });
        } else if is_ident_start(c) {
            while i < b.len() && is_ident_char(b[i]) {
                i += 1;
            }
            let word = &sql[start..i];
            // E'...', B'...', X'...', N'...', U&'...', U&"...".
            if b.get(i) == Some(&b'\'') && ["e", "b", "x", "n"].iter().any(|p| word.eq_ignore_ascii_case(p)) {
                i = string_end(b, i, word.eq_ignore_ascii_case("e"))?;
                toks.push(Tok { kind: Kind::Str, text: &sql[start..i], at: start });
            } else if word.eq_ignore_ascii_case("u") && b.get(i) == Some(&b'&') && b.get(i + 1) == Some(&b'\'') {
                i = string_end(b, i + 1, false)?;
                toks.push(Tok { kind: Kind::Str, text: &sql[start..i], at: start });
            } else if word.eq_ignore_ascii_case("u") && b.get(i) == Some(&b'&') && b.get(i + 1) == Some(&b'"') {
                let from = i + 2;
                i = quoted_end(b, i + 1)?;
                toks.push(Tok { kind: Kind::Quoted, text: &sql[from..i - 1], at: start });
            } else {
                toks.push(Tok { kind: Kind::Word, text: &sql[start..i], at: start });
            }
        } else if c == b':' {
            match b.get(i + 1) {
                Some(b':') => {
                    i += 2;
                    toks.push(Tok { kind: Kind::Cast, text: &sql[start..i], at: start });
                }
                Some(b'=') => {
                    i += 2;
                    toks.push(Tok { kind: Kind::ColonEq, text: &sql[start..i], at: start });
                }
                _ => {
                    i += 1;
                    toks.push(Tok { kind: Kind::Punct, text: &sql[start..i], at: start });
                }
            }
        } else if b"()[],;.".contains(&c) {
            i += 1;
            toks.push(Tok { kind: Kind::Punct, text: &sql[start..i], at: start });
        } else if is_op_char(c) {
            let mut end = i;
            while end < b.len() && is_op_char(b[end]) {
                if end > i && (b[end..].starts_with(b"--") || b[end..].starts_with(b"/*")) {
                    break;
                }
                end += 1;
            }
            // As Postgres' scanner: a multi-character operator ends in + or -
            // only if it holds one of ~ ! @ # % ^ & | ` ?.
            let op = &b[i..end];
            if op.len() > 1 && matches!(op[op.len() - 1], b'+' | b'-') && !op.iter().any(|x| b"~!@#%^&|`?".contains(x))
            {
                while end - i > 1 && matches!(b[end - 1], b'+' | b'-') {
                    end -= 1;
                }
            }
            i = end;
            let kind = if &sql[start..i] == "=>" { Kind::Arrow } else { Kind::Op };
            toks.push(Tok { kind, text: &sql[start..i], at: start });
        } else {
            return Err(format!("unexpected {:?} at byte {start}", &sql[start..start + 1]));
        }
    }
    Ok(toks)
}

/// For each `(` or `[`, the index of its closing token (and the other way
/// round); `None` for unbalanced ones.
fn partners(toks: &[Tok<'_>]) -> Vec<Option<usize>> {
    let mut partner = vec![None; toks.len()];
    let mut open: Vec<usize> = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        if t.punct("(") || t.punct("[") {
            open.push(i);
        } else if t.punct(")") || t.punct("]") {
            if let Some(o) = open.pop() {
                partner[o] = Some(i);
                partner[i] = Some(o);
            }
        }
    }
    partner
}

/// Walks back from token `from` (inclusive) at its own parenthesis depth,
/// skipping over parenthesised groups, until `stop` says yes or no; `None`
/// at an opening parenthesis or the start.
fn back_at_depth(
    toks: &[Tok<'_>],
    partner: &[Option<usize>],
    from: usize,
    mut stop: impl FnMut(&Tok<'_>) -> Option<bool>,
) -> Option<bool> {
    let mut k = from as isize;
    while k >= 0 {
        let t = &toks[k as usize];
        if t.punct(")") || t.punct("]") {
            k = partner[k as usize]? as isize - 1;
            continue;
        }
        if t.punct("(") || t.punct("[") || t.punct(";") {
            return None;
        }
        if let Some(answer) = stop(t) {
            return Some(answer);
        }
        k -= 1;
    }
    None
}

/// Whether the `=` at `i` assigns rather than compares: `SET col = ...`
/// (UPDATE, ON CONFLICT, a function's SET clause), PL/pgSQL's
/// `RAISE ... USING option = ...` and `GET DIAGNOSTICS var = item`.
fn is_assignment(toks: &[Tok<'_>], partner: &[Option<usize>], i: usize) -> bool {
    // The target: a column, maybe qualified and subscripted.
    let mut j = i as isize - 1;
    while j >= 0 && toks[j as usize].punct("]") {
        match partner[j as usize] {
            Some(o) => j = o as isize - 1,
            None => return false,
        }
    }
    if j < 0 || !matches!(toks[j as usize].kind, Kind::Word | Kind::Quoted) {
        return false;
    }
    let target = toks[j as usize];
    while j >= 2 && toks[j as usize - 1].punct(".") && matches!(toks[j as usize - 2].kind, Kind::Word | Kind::Quoted) {
        j -= 2;
    }
    if j < 1 {
        return false;
    }
    let lead = j as usize - 1;
    let before = toks[lead];
    if before.is_any(&["SET", "DIAGNOSTICS"]) {
        return true;
    }
    // Storage parameters and options: WITH (name = value, ...), and
    // ALTER ... SET (name = value, ...).
    if before.punct("(") || before.punct(",") {
        if let Some(open) = enclosing_paren(toks, partner, lead) {
            if open >= 1 && toks[open - 1].is_any(&["WITH", "SET"]) {
                return true;
            }
        }
    }
    // RAISE ... USING option = expr, option = expr
    if (before.is("USING") || before.punct(",")) && target.is_any(RAISE_OPTIONS) && in_raise(toks, partner, lead) {
        return true;
    }
    if !before.punct(",") {
        return false;
    }
    // Further along a SET clause, or a GET DIAGNOSTICS list.
    back_at_depth(toks, partner, lead, |t| {
        if t.is_any(&["SET", "DIAGNOSTICS"]) {
            Some(true)
        } else if t.is_any(SET_CLAUSE_ENDS) {
            Some(false)
        } else {
            None
        }
    }) == Some(true)
}

/// The `(` that the token at `from` (a `(` itself, or inside one) opens or
/// sits in.
fn enclosing_paren(toks: &[Tok<'_>], partner: &[Option<usize>], from: usize) -> Option<usize> {
    let mut k = from as isize;
    while k >= 0 {
        let t = &toks[k as usize];
        if t.punct(")") || t.punct("]") {
            k = partner[k as usize]? as isize - 1;
            continue;
        }
        if t.punct("(") {
            return Some(k as usize);
        }
        if t.punct("[") || t.punct(";") {
            return None;
        }
        k -= 1;
    }
    None
}

/// Whether token `from` sits after `USING` in a PL/pgSQL `RAISE` statement.
fn in_raise(toks: &[Tok<'_>], partner: &[Option<usize>], from: usize) -> bool {
    let mut seen_using = false;
    back_at_depth(toks, partner, from, |t| {
        if t.is("USING") {
            seen_using = true;
        }
        t.is("RAISE").then_some(seen_using)
    }) == Some(true)
}

/// Whether the `substring(` or `overlay(` whose `(` is at `open` is the
/// keyword form (`substring(x FROM 2 FOR 3)`, `overlay(x PLACING y FROM 2)`),
/// which the grammar turns into a call of `pg_catalog`'s function. The plain
/// form (`substring(x, 2, 3)`) looks the function up through the search_path.
fn keyword_form(toks: &[Tok<'_>], partner: &[Option<usize>], open: usize) -> bool {
    let Some(close) = partner[open] else { return false };
    let mut k = open + 1;
    while k < close {
        if toks[k].punct("(") || toks[k].punct("[") {
            k = partner[k].unwrap_or(close) + 1;
            continue;
        }
        if toks[k].is_any(&["FROM", "FOR", "PLACING", "SIMILAR"]) {
            return true;
        }
        k += 1;
    }
    false
}

/// How many commas separate the arguments in the parentheses opening at `open`.
fn top_level_commas(toks: &[Tok<'_>], partner: &[Option<usize>], open: usize) -> usize {
    let Some(close) = partner[open] else { return 0 };
    let mut k = open + 1;
    let mut commas = 0;
    while k < close {
        if toks[k].punct("(") || toks[k].punct("[") {
            k = partner[k].unwrap_or(close) + 1;
            continue;
        }
        commas += usize::from(toks[k].punct(","));
        k += 1;
    }
    commas
}

/// Whether a token stands for a value, so that an operator after it is binary.
fn is_operand(t: &Tok<'_>, after_dot: bool) -> bool {
    match t.kind {
        Kind::Word => after_dot || !t.is_any(RESERVED) || t.is_any(VALUE_KEYWORDS),
        Kind::Quoted | Kind::Str | Kind::Dollar | Kind::Param | Kind::Num => true,
        Kind::Punct => t.text == ")" || t.text == "]",
        _ => false,
    }
}

/// Which operator lookup by name the word `t` starts, if any.
fn lookup_by_name(t: &Tok<'_>, before: Option<Tok<'_>>, after: Option<Tok<'_>>) -> Option<&'static str> {
    let before_is = |w: &[&str]| before.is_some_and(|p| p.is_any(w));
    let after_is = |w: &str| after.is_some_and(|a| a.is(w));
    if t.is("NOT") && after_is("IN") {
        Some("NOT IN looks up <> by name")
    } else if t.is("IN") && after.is_some_and(|a| a.punct("(")) && !before_is(&["NOT"]) {
        Some("IN (...) looks up = by name")
    } else if t.is("BETWEEN") {
        Some("BETWEEN looks up >= and <= by name")
    } else if t.is_any(&["LIKE", "ILIKE"]) {
        Some("LIKE/ILIKE look up ~~ by name")
    } else if t.is("SIMILAR") && after_is("TO") {
        Some("SIMILAR TO looks up ~ by name")
    } else if t.is("DISTINCT") && after_is("FROM") && before_is(&["IS", "NOT"]) {
        Some("IS [NOT] DISTINCT FROM looks up = by name")
    } else if t.is("NULLIF") && after.is_some_and(|a| a.punct("(")) {
        Some("NULLIF looks up = by name")
    } else if t.is("CASE") && !after_is("WHEN") && !before_is(&["END"]) {
        Some("CASE x WHEN looks up = by name")
    } else {
        None
    }
}

/// Whether the word at `i`, followed by a column list, names a CTE after
/// the first: `WITH a AS (...), b(x) AS (...)`.
fn is_later_cte(toks: &[Tok<'_>], partner: &[Option<usize>], i: usize) -> bool {
    let Some(close) = partner[i + 1] else { return false };
    if i == 0 || !toks[i - 1].punct(",") || !toks.get(close + 1).is_some_and(|t| t.is("AS")) {
        return false;
    }
    // Back to WITH, over nothing but other CTEs: names, AS, [NOT]
    // MATERIALIZED and commas (their queries are skipped as groups).
    back_at_depth(toks, partner, i - 1, |t| {
        if t.is_any(&["WITH", "RECURSIVE"]) {
            Some(true)
        } else if t.punct(",")
            || t.is_any(&["AS", "NOT", "MATERIALIZED"])
            || (t.kind == Kind::Word && !paren_syntax(t))
            || t.kind == Kind::Quoted
        {
            None
        } else {
            Some(false)
        }
    }) == Some(true)
}

/// A line of context around byte `at`.
fn context(sql: &str, at: usize) -> String {
    let mut from = at.saturating_sub(30);
    while !sql.is_char_boundary(from) {
        from -= 1;
    }
    let mut to = (at + 40).min(sql.len());
    while !sql.is_char_boundary(to) {
        to += 1;
    }
    sql[from..to].split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What in `sql` is not immune to search_path shadowing, one line each;
/// empty if nothing. Dollar-quoted bodies are checked as SQL too.
fn unqualified(sql: &str) -> Vec<String> {
    let toks = match lex(sql) {
        Ok(t) => t,
        Err(e) => return vec![format!("cannot lex: {e}")],
    };
    let partner = partners(&toks);
    let mut found = Vec::new();
    let mut bodies = Vec::new();
    let mut report = |at: usize, what: String| found.push(format!("{what}: …{}…", context(sql, at)));
    let prev = |i: usize| i.checked_sub(1).map(|p| toks[p]);
    let next = |i: usize| toks.get(i + 1).copied();
    // Tokens inside OPERATOR(...), already judged.
    let mut skip_to = 0;
    for (i, t) in toks.iter().enumerate() {
        if i < skip_to {
            continue;
        }
        let before = prev(i);
        let after = next(i);
        let after_dot = before.is_some_and(|p| p.punct("."));
        let schema = || (i >= 2 && after_dot).then(|| toks[i - 2].text);
        // The `)` of an OPERATOR(...) ends an operator, not an operand or a
        // FROM item.
        let after_operator = before
            .is_some_and(|p| p.punct(")") && partner[i - 1].is_some_and(|o| o >= 1 && toks[o - 1].is("OPERATOR")));
        if t.kind == Kind::Word && !after_dot {
            if let Some(what) = lookup_by_name(t, before, after) {
                report(t.at, what.into());
            }
        }
        match t.kind {
            Kind::Dollar => {
                bodies.extend(unqualified(t.text).into_iter().map(|f| format!("in a dollar-quoted body: {f}")))
            }
            Kind::Word | Kind::Quoted if after.is_some_and(|a| a.punct("(")) => {
                let unquoted = t.kind == Kind::Word;
                if unquoted && t.is("OPERATOR") && !after_dot {
                    // OPERATOR(schema.op)
                    let close = partner[i + 1].unwrap_or(toks.len() - 1);
                    let inner = &toks[i + 2..close];
                    match inner {
                        [s, dot, op]
                            if matches!(s.kind, Kind::Word | Kind::Quoted) && dot.punct(".") && op.kind == Kind::Op =>
                        {
                            if s.text.eq_ignore_ascii_case("pg_temp") {
                                report(t.at, format!("OPERATOR(pg_temp.{}) names the temporary schema", op.text));
                            }
                        }
                        _ => report(t.at, "OPERATOR(...) without a schema".into()),
                    }
                    skip_to = close + 1;
                    continue;
                }
                if let Some(s) = schema() {
                    if s.eq_ignore_ascii_case("pg_temp") {
                        report(t.at, format!("function pg_temp.{}() is in the temporary schema", t.text));
                    }
                    // Not errors of qualification, but made while qualifying.
                    if unquoted && t.is_any(&["COALESCE", "NULLIF", "GREATEST", "LEAST"]) {
                        report(t.at, format!("{}(...) is syntax, not a function: write it without a schema", t.text));
                    }
                    if unquoted && t.is("UNNEST") && top_level_commas(&toks, &partner, i + 1) > 0 {
                        report(
                            t.at,
                            "unnest(a, b) is syntax for ROWS FROM (pg_catalog.unnest(a), pg_catalog.unnest(b)), \
                             which a schema-qualified unnest is not: write that"
                                .into(),
                        );
                    }
                    continue;
                }
                if unquoted && paren_syntax(t) {
                    continue;
                }
                if unquoted && t.is_any(&["SUBSTRING", "OVERLAY"]) {
                    if !keyword_form(&toks, &partner, i + 1) {
                        report(t.at, format!("function {}() is not schema-qualified", t.text));
                    }
                    continue;
                }
                if unquoted && t.is("NULLIF") {
                    continue; // reported above, with the other lookups by name
                }
                // A column list: of an alias (`AS u(id)`, `unnest(..) u(id)`),
                // of an INSERT's table, of a CTE (`WITH x(a) AS`).
                let column_list = before.is_some_and(|p| {
                    p.is_any(&["AS", "INTO", "WITH", "RECURSIVE"]) || (p.punct(")") && !after_operator)
                }) || is_later_cte(&toks, &partner, i);
                // Syntax of unreserved keywords, known by what comes before.
                let contextual = (t.is("CONFLICT") && before.is_some_and(|p| p.is("ON")))
                    || (t.is("KEY") && before.is_some_and(|p| p.is_any(&["PRIMARY", "FOREIGN"])))
                    || (t.is("BY") && before.is_some_and(|p| p.is_any(&["ORDER", "GROUP", "PARTITION"])))
                    // UPDATE t SET (a, b) = ..., ALTER TABLE t SET (option = ...)
                    || (t.is("SET") && i >= 2 && {
                        let (name, lead) = (toks[i - 1], toks[i - 2]);
                        (name.kind == Kind::Quoted || (name.kind == Kind::Word && !name.is_any(RESERVED)))
                            && (lead.punct(".") || lead.is_any(&["TABLE", "INDEX", "VIEW", "UPDATE", "ONLY", "COLUMN", "AS", "EXISTS"]))
                    });
                if !(column_list || (unquoted && contextual)) {
                    report(t.at, format!("function {}() is not schema-qualified", t.text));
                }
            }
            Kind::Op => {
                let operand_before =
                    !after_operator && before.is_some_and(|p| is_operand(&p, i >= 2 && toks[i - 2].punct(".")));
                let ok = match t.text {
                    // SELECT *, t.*, count(*): not multiplication.
                    "*" => !operand_before,
                    // A negative number is a literal, unless a cast or a
                    // subscript binds the number first (`-1::bigint`).
                    "-" => {
                        !operand_before
                            && after.is_some_and(|a| a.kind == Kind::Num)
                            && !toks.get(i + 2).is_some_and(|n| n.kind == Kind::Cast || n.punct("["))
                    }
                    "=" => is_assignment(&toks, &partner, i),
                    _ => false,
                };
                if !ok {
                    report(t.at, format!("operator {} is not in OPERATOR(schema.op)", t.text));
                }
            }
            _ => {}
        }
    }
    found.extend(bodies);
    found
}

/// Panics, listing every offender, unless every statement is qualified
/// throughout. Statements are (name, sql).
pub fn assert_qualified(statements: &[(&str, &str)]) {
    let offenders: Vec<String> = statements
        .iter()
        .flat_map(|(name, sql)| unqualified(sql).into_iter().map(move |f| format!("{name}: {f}")))
        .collect();
    assert!(offenders.is_empty(), "SQL open to search_path shadowing:\n{}", offenders.join("\n"));
}

/// The SQL of each `extension_sql!(r#"..."#, ...)` in a module's source
/// (`include_str!` of the module): the macro takes only a literal, so the
/// test reads it there.
pub fn extension_sql_blocks(source: &str) -> Vec<&str> {
    let mut blocks = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("extension_sql!(") {
        rest = &rest[at + "extension_sql!(".len()..];
        let Some(open) = rest.find("r#\"") else { break };
        let body = &rest[open + 3..];
        let Some(close) = body.find("\"#") else { break };
        blocks.push(&body[..close]);
        rest = &body[close..];
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (sql, what it must report, by a word of each finding; empty: nothing).
    fn check(cases: &[(&str, &[&str])]) {
        for (sql, expected) in cases {
            let found = unqualified(sql);
            assert_eq!(found.len(), expected.len(), "{sql}\nfound: {found:#?}\nexpected: {expected:?}");
            for (f, e) in found.iter().zip(expected.iter()) {
                assert!(f.contains(e), "{sql}\nfound: {f}\nexpected it to mention {e:?}");
            }
        }
    }

    #[test]
    fn function_calls_name_their_schema() {
        check(&[
            ("SELECT pg_catalog.now(), outbox.enqueue('k', '1')", &[]),
            ("SELECT now()", &["now()"]),
            ("SELECT pg_catalog.count(*), pg_catalog.sum(x) FROM t", &[]),
            ("SELECT count(*) FROM t", &["count()"]),
            ("SELECT pg_catalog.sum(n) OVER (ROWS UNBOUNDED PRECEDING) FROM t", &[]),
            ("SELECT sum(n) OVER (ROWS UNBOUNDED PRECEDING) FROM t", &["sum()"]),
            ("SELECT pg_catalog.count(x) FILTER (WHERE y) FROM t", &[]),
            ("SELECT pg_catalog.string_agg(x, ',' ORDER BY x) FROM t", &[]),
            ("SELECT string_agg(x, ',') FROM t", &["string_agg()"]),
            ("SELECT x FROM pg_catalog.unnest($1::text[]) AS u(x)", &[]),
            ("SELECT x FROM unnest($1::text[]) AS u(x)", &["unnest()"]),
            ("SELECT * FROM (SELECT 1) s(x)", &[]),
            ("SELECT x FROM pg_catalog.unnest($1::text[]) u(x)", &[]),
            ("SELECT \"pg_catalog\".\"format\"('%s', 1)", &[]),
            ("SELECT \"format\"('%s', 1)", &["format()"]),
            ("SELECT pg_temp.f(1)", &["temporary"]),
            // Mistakes made while qualifying: syntax is not a function.
            ("SELECT pg_catalog.coalesce(a, b)", &["syntax"]),
            ("SELECT * FROM pg_catalog.unnest($1::text[], $2::text[]) AS u(a, b)", &["ROWS FROM"]),
            ("SELECT * FROM ROWS FROM (pg_catalog.unnest($1::text[]), pg_catalog.unnest(ARRAY[1, 2])) AS u(a, b)", &[]),
            // Function-like syntax, and types with a modifier.
            (
                "SELECT coalesce(a, b), greatest(a, b), least(a, b), extract(epoch FROM t), cast(x AS numeric(10, 2))",
                &[],
            ),
            ("SELECT trim(x), position('a' IN x), ROW(1, 2), ARRAY(SELECT 1), x::varchar(3), interval(3) '1 s'", &[]),
            ("SELECT EXISTS (SELECT 1) AND NOT (a) OR (b)", &[]),
            ("SELECT substring(x FROM 2 FOR 3), overlay(x PLACING 'a' FROM 2)", &[]),
            ("SELECT substring(x, 2, 3)", &["substring()"]),
            ("SELECT overlay(x, 'a', 2)", &["overlay()"]),
            ("SELECT pg_catalog.substring(x, 2, 3)", &[]),
            // Column lists: of an alias, an INSERT, a CTE; and CTEs.
            ("WITH picked AS (SELECT 1), x(a) AS (SELECT 2) SELECT * FROM picked", &[]),
            ("INSERT INTO t (a, b) VALUES (1, 2)", &[]),
            ("INSERT INTO outbox.queue AS q (a) VALUES (1) ON CONFLICT (a) DO NOTHING", &[]),
            ("SELECT * FROM pg_catalog.pg_partition_ancestors($1) WITH ORDINALITY AS a(relid, nearness)", &[]),
            ("SELECT DISTINCT ON (a) a FROM t ORDER BY (a)", &[]),
            ("CREATE TABLE outbox.t (a int, PRIMARY KEY (a), CHECK (a IS NOT NULL))", &[]),
            ("CREATE FUNCTION outbox.f() RETURNS TABLE (a int) LANGUAGE sql AS $$ SELECT 1 $$", &[]),
            ("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$", &["f()"]),
            ("SELECT 1 WHERE f(1)", &["f()"]),
            ("SELECT 1 WHERE a OPERATOR(pg_catalog.<=) now()", &["now()"]),
            ("SELECT 1 WHERE a OPERATOR(pg_catalog.<=) pg_catalog.now()", &[]),
            ("SELECT a, f(1) FROM t", &["f()"]),
            ("SELECT 1 FROM t JOIN LATERAL (SELECT 1) s ON true", &[]),
            ("SELECT 1 FROM t, f(1) AS (a int)", &["f()"]),
            ("WITH a AS (SELECT 1) SELECT 1 FROM t, f(1) AS (a int)", &["f()"]),
        ]);
    }

    #[test]
    fn operators_name_their_schema() {
        check(&[
            ("SELECT 1 WHERE a OPERATOR(pg_catalog.=) b", &[]),
            ("SELECT 1 WHERE a = b", &["operator ="]),
            ("SELECT 1 WHERE a OPERATOR(=) b", &["without a schema"]),
            ("SELECT a OPERATOR(pg_temp.+) b", &["temporary"]),
            ("SELECT a <> b, a != b, a < b, a > b, a <= b, a >= b", &["<>", "!=", "<", ">", "<=", ">="]),
            ("SELECT a + b, a - b, a * b, a / b, a % b, a ^ b", &["+", "-", "*", "/", "%", "^"]),
            ("SELECT a || b, a ~~ b, a & b, a | b, a # b", &["||", "~~", "&", "|", "#"]),
            ("SELECT a @> b, a <@ b, a -> 'k', a ->> 'k', a #>> '{k}'", &["@>", "<@", "->", "->>", "#>>"]),
            ("SELECT a OPERATOR(pg_catalog.||) b, a OPERATOR(pg_catalog.->>) 'k'", &[]),
            // Not operators.
            ("SELECT *, t.* FROM t", &[]),
            ("DELETE FROM t RETURNING *", &[]),
            ("SELECT x::text::point, $1::bigint[], a[1:2]", &[]),
            ("SELECT outbox.register(kind => 'k', url => 'u')", &[]),
            ("SELECT -1, ARRAY[-2], pg_catalog.f(-3.5e-2), CASE WHEN x THEN -1 ELSE -2 END", &[]),
            // Binary minus, or a minus applied to a cast or an expression.
            ("SELECT a -1, (a) - 1, END -1", &["-", "-", "-"]),
            ("SELECT -1::bigint, -x, +1", &["-", "-", "+"]),
            ("SELECT t.order - 1", &["-"]),
            // Column-name keywords can name columns.
            ("SELECT position * 2, time -1 FROM t", &["*", "-"]),
            ("SELECT 1 WHERE a OPERATOR(pg_catalog.>=) -1", &[]),
            // The scanner's rule: `<-1` is `<` and `-1`.
            ("SELECT 1 WHERE a <-1", &["<"]),
            // Assignments are not comparisons.
            ("UPDATE t SET a = 1, b = CASE WHEN c OPERATOR(pg_catalog.=) 1 THEN 2 END, d[1] = 3 WHERE e OPERATOR(pg_catalog.=) 4", &[]),
            ("UPDATE t SET a = 1 WHERE b = 2", &["operator ="]),
            ("UPDATE t SET a = 1 WHERE b OPERATOR(pg_catalog.=) 2 AND c = 3", &["operator ="]),
            ("UPDATE t SET a = 1, b = (c = 2)", &["operator ="]),
            ("INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = excluded.a", &[]),
            ("CREATE FUNCTION outbox.f() RETURNS int LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$ SELECT 1 $$", &[]),
            ("SELECT a, b = c FROM t", &["operator ="]),
            ("CREATE TABLE outbox.t (a int) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02)", &[]),
            ("CREATE INDEX i ON outbox.t (a) WITH (toast.x = 1)", &[]),
            ("ALTER TABLE outbox.t SET (fillfactor = 70)", &[]),
            ("ALTER TABLE t ALTER COLUMN c SET (n_distinct = 1)", &[]),
            ("SELECT set(1)", &["set()"]),
            ("SELECT 1 FROM t WHERE (a = 1, b = 2) OPERATOR(pg_catalog.=) (c, d)", &["operator =", "operator ="]),
            ("SELECT 1 FROM t WHERE f(a = 1)", &["f()", "operator ="]),
        ]);
    }

    #[test]
    fn syntax_that_looks_operators_up_by_name() {
        check(&[
            ("SELECT 1 WHERE a IN (1, 2)", &["IN (...)"]),
            ("SELECT 1 WHERE a IN (SELECT b FROM t)", &["IN (...)"]),
            ("SELECT 1 WHERE a OPERATOR(pg_catalog.=) ANY (SELECT b FROM t)", &[]),
            ("SELECT 1 WHERE a NOT IN (SELECT b FROM t)", &["NOT IN"]),
            ("SELECT 1 WHERE NOT (a OPERATOR(pg_catalog.=) ANY (SELECT b FROM t))", &[]),
            ("SELECT 1 WHERE a OPERATOR(pg_catalog.<>) ALL ($1::int[])", &[]),
            ("SELECT 1 WHERE a BETWEEN 1 AND 2", &["BETWEEN"]),
            ("SELECT 1 WHERE a LIKE 'x%' OR a ILIKE 'y%'", &["LIKE", "LIKE"]),
            ("SELECT 1 WHERE a OPERATOR(pg_catalog.~~) 'x%'", &[]),
            ("SELECT 1 WHERE a SIMILAR TO 'x'", &["SIMILAR TO"]),
            ("SELECT 1 WHERE a IS DISTINCT FROM b OR a IS NOT DISTINCT FROM b", &["DISTINCT", "DISTINCT"]),
            ("SELECT DISTINCT a FROM t", &[]),
            ("SELECT nullif(a, b)", &["NULLIF"]),
            ("SELECT CASE a WHEN 1 THEN 2 END", &["CASE x WHEN"]),
            ("BEGIN CASE WHEN x THEN RETURN 1; END CASE; END", &[]),
            ("SELECT CASE WHEN a OPERATOR(pg_catalog.=) 1 THEN 2 END", &[]),
            ("SELECT (a, b) OPERATOR(pg_catalog.>) (c, d)", &[]),
            ("SELECT (a, b) > (c, d)", &["operator >"]),
        ]);
    }

    #[test]
    fn literals_quotes_comments_and_bodies() {
        check(&[
            ("SELECT 'now() = 1 || x IN (1)', E'it\\'s a = b', $1, $$ $$", &[]),
            ("SELECT 'a''b = c' -- now() = 1\n /* count(*) /* nested = */ < */", &[]),
            ("SELECT \"a = b\"", &[]),
            ("SELECT U&'d\\0061t\\+000061 = 1', X'1F', B'101', N'n = 1'", &[]),
            ("SELECT pg_catalog.format('(%s,0)', $2)::tid, 1.5, .5, 1e10, 0x1F", &[]),
            // Function bodies are SQL too.
            (
                "CREATE FUNCTION outbox.f() RETURNS int LANGUAGE sql AS $$ SELECT now() $$",
                &["dollar-quoted body: function now()"],
            ),
            (
                "CREATE FUNCTION outbox.f() RETURNS int LANGUAGE sql AS $body$ SELECT a = b $body$",
                &["dollar-quoted body: operator ="],
            ),
            ("SELECT 'unterminated", &["cannot lex"]),
            ("SELECT $$ unterminated", &["cannot lex"]),
        ]);
    }

    #[test]
    fn plpgsql_assignments_are_not_comparisons() {
        let body = "
BEGIN
    IF n OPERATOR(pg_catalog.>) 0 THEN
        RAISE EXCEPTION 'job % is not dead', x
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Only dead jobs.';
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM outbox.wake();
    RETURN n;
END";
        check(&[(body, &[])]);
        check(&[
            ("BEGIN IF n > 0 THEN RETURN 1; END IF; END", &["operator >"]),
            ("BEGIN RAISE EXCEPTION 'x %', a = b USING HINT = 'h'; END", &["operator ="]),
            ("BEGIN PERFORM wake(); END", &["wake()"]),
        ]);
    }

    #[test]
    fn extension_sql_blocks_are_found() {
        let source = "extension_sql!(\n    r#\"\nSELECT 1;\n\"#,\n    name = \"a\"\n);\nfn f() {}\nextension_sql!(r#\"SELECT 2\"#, name = \"b\");";
        assert_eq!(extension_sql_blocks(source), ["\nSELECT 1;\n", "SELECT 2"]);
    }

    #[test]
    #[should_panic(expected = "bad: function now()")]
    fn assert_qualified_names_the_offender() {
        assert_qualified(&[("good", "SELECT pg_catalog.now()"), ("bad", "SELECT now()")]);
    }
}


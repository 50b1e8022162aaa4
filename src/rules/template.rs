//! URL templates: `{id}` and `{kind}` placeholders, validated at `register`
//! time and rendered per job. Pure: no Postgres in here.

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

/// Everything but RFC 3986 unreserved characters is encoded, so an id can
/// never add a path segment, a query or a fragment.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Longest URL template accepted by `register`.
const MAX_TEMPLATE_LEN: usize = 2048;

#[derive(Debug, PartialEq, Eq)]
pub enum TemplateError {
    Empty,
    TooLong,
    UnknownPlaceholder(String),
    Unbalanced,
    Whitespace,
    Invalid(String),
    Scheme(String),
    NoHost,
    Credentials,
}

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Empty => write!(f, "url must not be empty"),
            Self::TooLong => write!(f, "url is longer than {MAX_TEMPLATE_LEN} bytes"),
            Self::UnknownPlaceholder(p) => write!(f, "url has an unknown placeholder {{{p}}}"),
            Self::Unbalanced => write!(f, "url has an unbalanced brace"),
            Self::Whitespace => write!(f, "url must not contain whitespace or control characters"),
            Self::Invalid(cause) => write!(f, "url is not a valid URL: {cause}"),
            Self::Scheme(s) => write!(f, "url scheme \"{s}\" is not allowed"),
            Self::NoHost => write!(f, "url has no host"),
            Self::Credentials => write!(f, "url must not embed credentials"),
        }
    }
}

/// A value as a path segment: percent-encoded, and `.` or `..` in full
/// (`%2E`, `%2E%2E`), which a proxy or framework would otherwise resolve as
/// dot segments, sending `DELETE /docs/..` to the collection.
fn encode(out: &mut String, value: &str) {
    match value {
        "." => out.push_str("%2E"),
        ".." => out.push_str("%2E%2E"),
        _ => out.extend(utf8_percent_encode(value, COMPONENT)),
    }
}

/// Substitutes `{id}` and `{kind}`, percent-encoding both values.
pub fn render(template: &str, kind: &str, id: &str) -> String {
    let mut out = String::with_capacity(template.len() + id.len() * 3);
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        if let Some(tail) = after.strip_prefix("{id}") {
            encode(&mut out, id);
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("{kind}") {
            encode(&mut out, kind);
            rest = tail;
        } else {
            // validate() rejects this; render stays total anyway.
            out.push('{');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Whether the record id is part of the host (or port): then nearly every
/// request goes to a host of its own, and a connection kept open for reuse
/// would only pile up.
pub fn id_in_authority(template: &str) -> bool {
    let after_scheme = template.split_once("://").map_or(template, |(_, rest)| rest);
    let authority = after_scheme.split(['/', '?', '#']).next().unwrap_or("");
    authority.contains("{id}")
}

/// Checks a template the way `register` needs: only known placeholders,
/// http(s) only, a host, and a URL that parses once rendered.
pub fn validate(template: &str) -> Result<(), TemplateError> {
    if template.trim().is_empty() {
        return Err(TemplateError::Empty);
    }
    if template.len() > MAX_TEMPLATE_LEN {
        return Err(TemplateError::TooLong);
    }
    if template.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(TemplateError::Whitespace);
    }
    let mut rest = template;
    while let Some(start) = rest.find(['{', '}']) {
        let after = &rest[start..];
        if after.starts_with('}') {
            return Err(TemplateError::Unbalanced);
        }
        let close = after.find('}').ok_or(TemplateError::Unbalanced)?;
        let name = &after[1..close];
        if name.contains('{') {
            return Err(TemplateError::Unbalanced);
        }
        if name != "id" && name != "kind" {
            return Err(TemplateError::UnknownPlaceholder(name.to_string()));
        }
        rest = &after[close + 1..];
    }
    let sample = render(template, "kind", "id");
    let parsed = url::Url::parse(&sample).map_err(|e| TemplateError::Invalid(e.to_string()))?;
    match parsed.scheme() {
        "http" | "https" => {}
        other => return Err(TemplateError::Scheme(other.to_string())),
    }
    // The URL parser would read "http:///x" as host "x"; insist on an authority.
    if sample.split_once("://").is_none_or(|(_, rest)| rest.is_empty() || rest.starts_with('/')) {
        return Err(TemplateError::NoHost);
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(TemplateError::NoHost);
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(TemplateError::Credentials);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_encoded_in_full() {
        assert_eq!(render("http://h/docs/{id}", "k", ".."), "http://h/docs/%2E%2E");
        assert_eq!(render("http://h/docs/{id}", "k", "."), "http://h/docs/%2E");
        assert_eq!(render("http://h/{kind}/{id}", ".", "..."), "http://h/%2E/...");
        assert_eq!(render("http://h/docs/{id}", "k", "a.b"), "http://h/docs/a.b");
    }

    #[test]
    fn renders_and_encodes() {
        let t = "http://127.0.0.1:8080/{kind}/{id}?x=1";
        assert_eq!(render(t, "user", "42"), "http://127.0.0.1:8080/user/42?x=1");
        assert_eq!(render(t, "user", "a/b?c#d e"), "http://127.0.0.1:8080/user/a%2Fb%3Fc%23d%20e?x=1");
        assert_eq!(render(t, "us er", "é"), "http://127.0.0.1:8080/us%20er/%C3%A9?x=1");
        assert_eq!(render("http://h/{id}{id}", "k", "-._~"), "http://h/-._~-._~");
        assert_eq!(render("http://h/static", "k", "1"), "http://h/static");
    }

    #[test]
    fn tells_when_the_id_picks_the_host() {
        assert!(id_in_authority("https://{id}.hooks.example.com/x"));
        assert!(id_in_authority("http://h:{id}"));
        assert!(!id_in_authority("http://{kind}.example.com/{id}"));
        assert!(!id_in_authority("http://h/{id}?host={id}"));
        assert!(!id_in_authority("http://h?{id}"));
    }

    #[test]
    fn validates() {
        assert_eq!(validate("http://localhost/{id}"), Ok(()));
        assert_eq!(validate("https://example.com:8443/{kind}/{id}"), Ok(()));
        assert_eq!(validate("http://[::1]:80/x"), Ok(()));
        let cases = [
            ("", TemplateError::Empty),
            ("   ", TemplateError::Empty),
            ("ftp://h/{id}", TemplateError::Scheme("ftp".into())),
            ("file:///etc/passwd", TemplateError::Scheme("file".into())),
            ("http://h/{ID}", TemplateError::UnknownPlaceholder("ID".into())),
            ("http://h/{id", TemplateError::Unbalanced),
            ("http://h/id}", TemplateError::Unbalanced),
            ("http://h/{{id}}", TemplateError::Unbalanced),
            ("http://h /x", TemplateError::Whitespace),
            ("http://h/x\n", TemplateError::Whitespace),
            ("http://u:p@h/x", TemplateError::Credentials),
            ("http:///x", TemplateError::NoHost),
            ("http:/x", TemplateError::NoHost),
        ];
        for (input, want) in cases {
            assert_eq!(validate(input), Err(want), "{input:?}");
        }
        assert!(matches!(validate("not a url"), Err(TemplateError::Whitespace)));
        assert!(matches!(validate("nourl"), Err(TemplateError::Invalid(_))));
        assert!(matches!(validate("http://"), Err(TemplateError::Invalid(_))));
        assert_eq!(validate(&format!("http://h/{}", "a".repeat(MAX_TEMPLATE_LEN))), Err(TemplateError::TooLong));
    }
}

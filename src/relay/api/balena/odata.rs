//! The part of OData (balena's Pine dialect) that the balena CLI sends: `$filter` with
//! `eq`, `ne`, `and`, `or`, `not`, parentheses, `startswith`/`endswith`/`substringof`,
//! and the `is_directly_accessible_by__user/any(…)` wrapper; `$select`; `$expand` with
//! nested options; `$orderby`; `$top` and `$skip`. Evaluated over JSON records, so each
//! resource says which fields it has. Anything else is an error the caller answers with
//! a 400, never a guess.

use serde_json::Value;

/// How deep parentheses and expands may nest.
const MAX_DEPTH: usize = 16;

/// Why a query option cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueryError(pub String);

fn bad<T>(message: impl Into<String>) -> Result<T, QueryError> {
    Err(QueryError(message.into()))
}

/// A `$filter` expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// Both.
    And(Box<Filter>, Box<Filter>),
    /// Either.
    Or(Box<Filter>, Box<Filter>),
    /// Not.
    Not(Box<Filter>),
    /// `a eq b` (or `ne` when `equal` is false).
    Compare {
        /// The left side.
        left: Operand,
        /// The right side.
        right: Operand,
        /// `eq` or `ne`.
        equal: bool,
    },
    /// `startswith(field,'x')`, `endswith(…)`, `substringof('x',field)`.
    Text {
        /// Which test.
        op: TextOp,
        /// The field.
        field: String,
        /// The text.
        text: String,
    },
    /// A condition always true for the records served: `is_directly_accessible_by__user/
    /// any(…)` (the records are the caller's already).
    True,
}

/// A text test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextOp {
    /// Starts with.
    StartsWith,
    /// Ends with.
    EndsWith,
    /// Contains.
    Contains,
}

/// One side of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// A field of the record.
    Field(String),
    /// A literal.
    Literal(Value),
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    Num(i64),
    Open,
    Close,
    Comma,
    Colon,
    Slash,
}

fn tokens(text: &str) -> Result<Vec<Token>, QueryError> {
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some(&(i, c)) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' | ')' | ',' | ':' | '/' => {
                chars.next();
                out.push(match c {
                    '(' => Token::Open,
                    ')' => Token::Close,
                    ',' => Token::Comma,
                    ':' => Token::Colon,
                    _ => Token::Slash,
                });
            }
            '\'' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\'')) if chars.peek().map(|&(_, c)| c) == Some('\'') => {
                            chars.next();
                            s.push('\'');
                        }
                        Some((_, '\'')) => break,
                        Some((_, c)) => s.push(c),
                        None => return bad("a string in $filter is not closed"),
                    }
                }
                out.push(Token::Str(s));
            }
            c if c.is_ascii_digit() || c == '-' => {
                let start = i;
                chars.next();
                while chars.peek().is_some_and(|&(_, c)| c.is_ascii_digit()) {
                    chars.next();
                }
                let end = chars.peek().map_or(text.len(), |&(j, _)| j);
                let n = text[start..end]
                    .parse()
                    .map_err(|_| QueryError(format!("{:?} is not a number", &text[start..end])))?;
                out.push(Token::Num(n));
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == '$' => {
                let start = i;
                while chars
                    .peek()
                    .is_some_and(|&(_, c)| c.is_ascii_alphanumeric() || c == '_' || c == '$')
                {
                    chars.next();
                }
                let end = chars.peek().map_or(text.len(), |&(j, _)| j);
                out.push(Token::Ident(text[start..end].to_owned()));
            }
            other => return bad(format!("unexpected {other:?} in $filter")),
        }
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn expect(&mut self, want: Token, what: &str) -> Result<(), QueryError> {
        match self.next() {
            Some(t) if t == want => Ok(()),
            _ => bad(format!("$filter: expected {what}")),
        }
    }

    fn keyword(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Token::Ident(w)) if w == word)
    }

    fn or(&mut self) -> Result<Filter, QueryError> {
        let mut left = self.and()?;
        while self.keyword("or") {
            self.next();
            left = Filter::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, QueryError> {
        let mut left = self.unary()?;
        while self.keyword("and") {
            self.next();
            left = Filter::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Filter, QueryError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return bad("$filter nests too deeply");
        }
        let result = if self.keyword("not") {
            self.next();
            self.unary().map(|f| Filter::Not(Box::new(f)))
        } else {
            self.primary()
        };
        self.depth -= 1;
        result
    }

    fn primary(&mut self) -> Result<Filter, QueryError> {
        if self.peek() == Some(&Token::Open) {
            self.next();
            let inner = self.or()?;
            self.expect(Token::Close, "')'")?;
            return Ok(inner);
        }
        let left = self.operand()?;
        if let Operand::Field(name) = &left {
            match self.peek() {
                Some(Token::Open) => return self.call(name.clone()),
                Some(Token::Slash) if name == "is_directly_accessible_by__user" => {
                    return self.accessible();
                }
                _ => {}
            }
        }
        let equal = match self.next() {
            Some(Token::Ident(op)) if op == "eq" => true,
            Some(Token::Ident(op)) if op == "ne" => false,
            _ => return bad("$filter: only eq and ne compare"),
        };
        let right = self.operand()?;
        Ok(Filter::Compare { left, right, equal })
    }

    /// `is_directly_accessible_by__user/any(x:<anything that parses>)`: every record
    /// served is the caller's, so the condition holds.
    fn accessible(&mut self) -> Result<Filter, QueryError> {
        self.expect(Token::Slash, "'/'")?;
        match self.next() {
            Some(Token::Ident(w)) if w == "any" => {}
            _ => return bad("$filter: only is_directly_accessible_by__user/any(…) is served"),
        }
        self.expect(Token::Open, "'('")?;
        match (self.next(), self.next()) {
            (Some(Token::Ident(_)), Some(Token::Colon)) => {}
            _ => return bad("$filter: any(…) takes a variable and a condition"),
        }
        let condition = self.or()?;
        self.expect(Token::Close, "')'")?;
        match condition {
            Filter::Compare {
                left: Operand::Literal(a),
                right: Operand::Literal(b),
                equal,
            } if (a == b) == equal => Ok(Filter::True),
            _ => bad("$filter: only is_directly_accessible_by__user/any(dau:1 eq 1) is served"),
        }
    }

    fn call(&mut self, function: String) -> Result<Filter, QueryError> {
        self.expect(Token::Open, "'('")?;
        let first = self.operand()?;
        self.expect(Token::Comma, "','")?;
        let second = self.operand()?;
        self.expect(Token::Close, "')'")?;
        let (op, field, text) = match (function.as_str(), first, second) {
            ("startswith", Operand::Field(f), Operand::Literal(Value::String(t))) => {
                (TextOp::StartsWith, f, t)
            }
            ("endswith", Operand::Field(f), Operand::Literal(Value::String(t))) => {
                (TextOp::EndsWith, f, t)
            }
            ("substringof", Operand::Literal(Value::String(t)), Operand::Field(f))
            | ("contains", Operand::Field(f), Operand::Literal(Value::String(t))) => {
                (TextOp::Contains, f, t)
            }
            _ => return bad(format!("$filter: {function}(…) is not served")),
        };
        Ok(Filter::Text { op, field, text })
    }

    fn operand(&mut self) -> Result<Operand, QueryError> {
        match self.next() {
            Some(Token::Str(s)) => Ok(Operand::Literal(Value::String(s))),
            Some(Token::Num(n)) => Ok(Operand::Literal(Value::from(n))),
            Some(Token::Ident(w)) if w == "true" => Ok(Operand::Literal(Value::Bool(true))),
            Some(Token::Ident(w)) if w == "false" => Ok(Operand::Literal(Value::Bool(false))),
            Some(Token::Ident(w)) if w == "null" => Ok(Operand::Literal(Value::Null)),
            Some(Token::Ident(w)) => Ok(Operand::Field(w)),
            _ => bad("$filter: expected a field or a value"),
        }
    }
}

/// Reads a `$filter`.
pub fn parse_filter(text: &str) -> Result<Filter, QueryError> {
    let mut parser = Parser {
        tokens: tokens(text)?,
        at: 0,
        depth: 0,
    };
    let filter = parser.or()?;
    if parser.at != parser.tokens.len() {
        return bad("$filter: unexpected text after the condition");
    }
    Ok(filter)
}

impl Filter {
    /// Checks that every field named is one of `fields`.
    pub fn check_fields(&self, fields: &[&str]) -> Result<(), QueryError> {
        let known = |f: &str| {
            if fields.contains(&f) {
                Ok(())
            } else {
                bad(format!("$filter: no field {f:?} here"))
            }
        };
        match self {
            Filter::And(a, b) | Filter::Or(a, b) => {
                a.check_fields(fields)?;
                b.check_fields(fields)
            }
            Filter::Not(a) => a.check_fields(fields),
            Filter::Compare { left, right, .. } => {
                for side in [left, right] {
                    if let Operand::Field(f) = side {
                        known(f)?;
                    }
                }
                Ok(())
            }
            Filter::Text { field, .. } => known(field),
            Filter::True => Ok(()),
        }
    }

    /// Whether `record` passes.
    pub fn matches(&self, record: &Value) -> bool {
        let value = |o: &Operand| match o {
            Operand::Field(f) => record.get(f).cloned().unwrap_or(Value::Null),
            Operand::Literal(v) => v.clone(),
        };
        match self {
            Filter::And(a, b) => a.matches(record) && b.matches(record),
            Filter::Or(a, b) => a.matches(record) || b.matches(record),
            Filter::Not(a) => !a.matches(record),
            Filter::Compare { left, right, equal } => (value(left) == value(right)) == *equal,
            Filter::Text { op, field, text } => match record.get(field) {
                Some(Value::String(s)) => match op {
                    TextOp::StartsWith => s.starts_with(text.as_str()),
                    TextOp::EndsWith => s.ends_with(text.as_str()),
                    TextOp::Contains => s.contains(text.as_str()),
                },
                _ => false,
            },
            Filter::True => true,
        }
    }

    /// A uuid prefix every matching record has, if the filter requires one (`uuid eq
    /// 'x'` or `startswith(uuid,'x')` on the top-level `and` chain): the store narrows by
    /// it before the filter runs.
    pub fn uuid_prefix(&self) -> Option<String> {
        match self {
            Filter::And(a, b) => a.uuid_prefix().or_else(|| b.uuid_prefix()),
            Filter::Compare {
                left: Operand::Field(f),
                right: Operand::Literal(Value::String(v)),
                equal: true,
            } if f == "uuid" => Some(v.clone()),
            Filter::Text {
                op: TextOp::StartsWith,
                field,
                text,
            } if field == "uuid" => Some(text.clone()),
            _ => None,
        }
    }
}

/// One `$orderby` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// The field.
    pub field: String,
    /// Descending.
    pub desc: bool,
}

/// Reads `$orderby`: `field [asc|desc]`, comma-separated.
pub fn parse_orderby(text: &str, fields: &[&str]) -> Result<Vec<Order>, QueryError> {
    text.split(',')
        .map(|part| {
            let mut words = part.split_whitespace();
            let field = words.next().unwrap_or_default().to_owned();
            if !fields.contains(&field.as_str()) {
                return bad(format!("$orderby: no field {field:?} here"));
            }
            let desc = match words.next() {
                None | Some("asc") => false,
                Some("desc") => true,
                Some(other) => return bad(format!("$orderby: {other:?} is not asc or desc")),
            };
            if words.next().is_some() {
                return bad("$orderby: field [asc|desc], comma-separated");
            }
            Ok(Order { field, desc })
        })
        .collect()
}

/// Sorts `records` by `order`: strings, numbers and booleans each in their natural
/// order, nulls first.
pub fn sort(records: &mut [Value], order: &[Order]) {
    fn key(v: Option<&Value>) -> (u8, String, f64) {
        match v {
            None | Some(Value::Null) => (0, String::new(), 0.0),
            Some(Value::Bool(b)) => (1, String::new(), f64::from(u8::from(*b))),
            Some(Value::Number(n)) => (2, String::new(), n.as_f64().unwrap_or(0.0)),
            Some(Value::String(s)) => (3, s.to_lowercase(), 0.0),
            Some(other) => (4, other.to_string(), 0.0),
        }
    }
    records.sort_by(|a, b| {
        for o in order {
            let (ka, kb) = (key(a.get(&o.field)), key(b.get(&o.field)));
            let ord =
                ka.0.cmp(&kb.0)
                    .then_with(|| ka.1.cmp(&kb.1))
                    .then_with(|| ka.2.total_cmp(&kb.2));
            let ord = if o.desc { ord.reverse() } else { ord };
            if ord.is_ne() {
                return ord;
            }
        }
        std::cmp::Ordering::Equal
    });
}

/// Reads `$select`: field names, comma-separated, each one of `fields`.
pub fn parse_select(text: &str, fields: &[&str]) -> Result<Vec<String>, QueryError> {
    text.split(',')
        .map(|f| {
            let f = f.trim();
            if fields.contains(&f) {
                Ok(f.to_owned())
            } else {
                bad(format!("$select: no field {f:?} here"))
            }
        })
        .collect()
}

/// The options of a collection or of one `$expand`: what is asked of the records.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    /// `$filter`.
    pub filter: Option<Filter>,
    /// `$select` (none: every field).
    pub select: Option<Vec<String>>,
    /// `$expand`: navigation name and its own options.
    pub expand: Vec<(String, Options)>,
    /// `$orderby`.
    pub orderby: Vec<Order>,
    /// `$top`.
    pub top: Option<usize>,
    /// `$skip`.
    pub skip: usize,
}

/// What a resource is made of, for checking the options asked of it.
pub struct Shape {
    /// Its plain fields.
    pub fields: &'static [&'static str],
    /// Its navigation fields, each with the shape it leads to.
    pub links: &'static [(&'static str, &'static Shape)],
}

impl Options {
    /// Reads options from `(name, value)` pairs (a query string, or an `$expand`'s
    /// parentheses), checked against `shape`.
    pub fn parse<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
        shape: &Shape,
    ) -> Result<Options, QueryError> {
        Options::parse_at(pairs, shape, 0)
    }

    fn parse_at<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
        shape: &Shape,
        depth: usize,
    ) -> Result<Options, QueryError> {
        if depth > MAX_DEPTH {
            return bad("$expand nests too deeply");
        }
        let mut options = Options::default();
        for (name, value) in pairs {
            match name {
                "$filter" => {
                    let filter = parse_filter(value)?;
                    filter.check_fields(shape.fields)?;
                    options.filter = Some(filter);
                }
                "$select" => options.select = Some(parse_select(value, shape.fields)?),
                "$orderby" => options.orderby = parse_orderby(value, shape.fields)?,
                "$top" => options.top = Some(count(value, "$top")?),
                "$skip" => options.skip = count(value, "$skip")?,
                "$expand" => {
                    for item in split_top(value, ',')? {
                        let (link, inner) = match item.find('(') {
                            Some(open) if item.ends_with(')') => {
                                (&item[..open], &item[open + 1..item.len() - 1])
                            }
                            Some(_) => return bad(format!("$expand: {item:?} is not closed")),
                            None => (item, ""),
                        };
                        let link = link.trim();
                        let Some((_, target)) = shape.links.iter().find(|(l, _)| *l == link) else {
                            return bad(format!("$expand: no link {link:?} here"));
                        };
                        let mut pairs = Vec::new();
                        for option in split_top(inner, ';')? {
                            if option.trim().is_empty() {
                                continue;
                            }
                            let Some((k, v)) = option.split_once('=') else {
                                return bad(format!("$expand: {option:?} is not name=value"));
                            };
                            pairs.push((k.trim(), v));
                        }
                        let nested = Options::parse_at(pairs, target, depth + 1)?;
                        options.expand.push((link.to_owned(), nested));
                    }
                }
                other if other.starts_with('$') => {
                    return bad(format!("{other} is not served"));
                }
                _ => {}
            }
        }
        Ok(options)
    }

    /// Filters, orders, pages and shapes `records`; `links` gives a record's linked
    /// records for each expand.
    pub fn apply(
        &self,
        mut records: Vec<Value>,
        links: &dyn Fn(&Value, &str) -> Vec<Value>,
    ) -> Vec<Value> {
        if let Some(filter) = &self.filter {
            records.retain(|r| filter.matches(r));
        }
        sort(&mut records, &self.orderby);
        let records = records
            .into_iter()
            .skip(self.skip)
            .take(self.top.unwrap_or(usize::MAX));
        records
            .map(|record| {
                let mut out = match &self.select {
                    Some(fields) => {
                        let mut m = serde_json::Map::new();
                        for f in fields {
                            m.insert(f.clone(), record.get(f).cloned().unwrap_or(Value::Null));
                        }
                        m
                    }
                    None => record.as_object().cloned().unwrap_or_default(),
                };
                for (link, nested) in &self.expand {
                    let linked = nested.apply(links(&record, link), links);
                    out.insert(link.clone(), Value::Array(linked));
                }
                Value::Object(out)
            })
            .collect()
    }
}

fn count(value: &str, what: &str) -> Result<usize, QueryError> {
    value
        .trim()
        .parse()
        .map_err(|_| QueryError(format!("{what} must be a number")))
}

/// Splits `text` at `sep` outside parentheses and quotes.
fn split_top(text: &str, sep: char) -> Result<Vec<&str>, QueryError> {
    let mut parts = Vec::new();
    let (mut depth, mut quoted, mut start) = (0usize, false, 0);
    for (i, c) in text.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| QueryError("unbalanced ')'".into()))?;
            }
            c if c == sep && !quoted && depth == 0 => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    if depth != 0 || quoted {
        return bad("unbalanced parentheses or quotes");
    }
    parts.push(&text[start..]);
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    static DEVICE: Shape = Shape {
        fields: &["uuid", "device_name", "is_online"],
        links: &[("belongs_to__application", &APP)],
    };
    static APP: Shape = Shape {
        fields: &["app_name", "slug"],
        links: &[],
    };

    #[test]
    fn the_filters_the_balena_cli_sends() {
        let pi = json!({"uuid": "abc1234ffff", "device_name": "pi's", "is_online": true});
        for (filter, matches) in [
            ("startswith(uuid,'abc1234')", true),
            ("startswith(uuid,'abd')", false),
            ("uuid eq 'abc1234ffff'", true),
            ("device_name eq 'pi''s'", true),
            ("(device_name eq 'x' or uuid eq 'abc1234ffff')", true),
            (
                "is_directly_accessible_by__user/any(dau:1 eq 1) and is_online eq true",
                true,
            ),
            ("not (is_online eq true)", false),
            ("is_online ne false and substringof('1234',uuid)", true),
        ] {
            let f = parse_filter(filter).unwrap();
            f.check_fields(DEVICE.fields).unwrap();
            assert_eq!(f.matches(&pi), matches, "{filter}");
        }
        assert_eq!(
            parse_filter("startswith(uuid,'abc1234')")
                .unwrap()
                .uuid_prefix()
                .as_deref(),
            Some("abc1234")
        );
    }

    #[test]
    fn what_is_not_served_is_an_error() {
        for filter in [
            "uuid gt 'a'",
            "length(uuid) eq 3",
            "uuid eq",
            "(uuid eq 'a'",
            "uuid eq 'a' extra",
            "is_directly_accessible_by__user/any(dau:dau/id eq 5)",
            "'unclosed",
            &"(".repeat(100),
            "uuid eq 'a' ; drop",
        ] {
            assert!(parse_filter(filter).is_err(), "{filter}");
        }
        let f = parse_filter("secret eq 'x'").unwrap();
        assert!(f.check_fields(DEVICE.fields).is_err());
    }

    #[test]
    fn select_expand_and_order() {
        let pairs = [
            ("$select", "uuid,device_name"),
            (
                "$expand",
                "belongs_to__application($select=app_name;$filter=slug eq 'pis')",
            ),
            ("$orderby", "device_name desc"),
        ];
        let options = Options::parse(pairs, &DEVICE).unwrap();
        let records = vec![
            json!({"uuid": "1", "device_name": "a", "is_online": true}),
            json!({"uuid": "2", "device_name": "b", "is_online": false}),
        ];
        let links = |_: &Value, _: &str| {
            vec![
                json!({"app_name": "Pis", "slug": "pis"}),
                json!({"app_name": "Other", "slug": "other"}),
            ]
        };
        let out = options.apply(records, &links);
        assert_eq!(
            out,
            vec![
                json!({"uuid": "2", "device_name": "b", "belongs_to__application": [{"app_name": "Pis"}]}),
                json!({"uuid": "1", "device_name": "a", "belongs_to__application": [{"app_name": "Pis"}]}),
            ]
        );
        for bad in [
            ("$select", "uuid,secret"),
            ("$expand", "owner"),
            ("$expand", "belongs_to__application($select=nope)"),
            ("$orderby", "device_name sideways"),
            ("$apply", "x"),
            ("$top", "-1"),
        ] {
            assert!(Options::parse([bad], &DEVICE).is_err(), "{bad:?}");
        }
    }
}

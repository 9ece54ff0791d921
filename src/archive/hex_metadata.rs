//! Reader for `metadata.config`, the package metadata inside a Hex package
//! tarball (tarball spec v3).
//!
//! The file is Erlang term text: a sequence of `{Key, Value}.` terms that
//! Erlang tools load with `file:consult/1`. It arrives inside an uploaded
//! tarball, so it is untrusted: we *parse* a closed set of literal forms
//! (binaries, strings, atoms, numbers, lists, tuples, maps) and reject
//! everything else (variables, operators, calls, records). Nothing is ever
//! evaluated, nesting is capped at [`MAX_DEPTH`] so a hostile file cannot
//! exhaust the stack, and every failure is an error value, never a panic.
//!
//! Deliberate differences from `file:consult/1`:
//! * a `.` ends a term even when no whitespace follows it (`{a}.{b}.`), as
//!   hex_core's own reader does;
//! * integers must fit in an `i64`;
//! * a binary segment must be a string or an integer, optionally `/utf8`;
//!   other segment types, sizes and out-of-range bytes are errors rather
//!   than being silently truncated;
//! * list tails (`[H | T]`) are not accepted; Hex tools never write them.

use std::collections::HashSet;

/// Deepest nesting of lists, tuples and maps accepted. Real metadata needs
/// about five levels; the cap bounds the parser's recursion.
pub const MAX_DEPTH: usize = 64;

/// Erlang refuses atoms longer than this, so we do too.
const MAX_ATOM_CHARS: usize = 255;

/// An Erlang term as it appears in metadata.config.
#[derive(Debug, Clone, PartialEq)]
pub enum Term {
    /// `<<"text">>`, `<<"text"/utf8>>`, `<<104,105>>` or `<<>>`.
    Binary(String),
    /// `"text"`: a charlist.
    String(String),
    /// `true`, `nil`, `'Quoted atom'`.
    Atom(String),
    Integer(i64),
    Float(f64),
    List(Vec<Term>),
    Tuple(Vec<Term>),
    /// `#{K => V}`, pairs in the order written.
    Map(Vec<(Term, Term)>),
}

/// Why metadata.config could not be read. Lines are 1-based.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MetadataError {
    #[error("line {line}: syntax error: {message}")]
    Syntax { line: usize, message: String },
    #[error("line {line}: string is never closed")]
    UnterminatedString { line: usize },
    #[error("line {line}: quoted atom is never closed")]
    UnterminatedAtom { line: usize },
    #[error("line {line}: `{opener}` is never closed")]
    Unclosed { line: usize, opener: &'static str },
    #[error("line {line}: term is not followed by the `.` terminator")]
    MissingTerminator { line: usize },
    #[error("line {line}: invalid escape sequence: {message}")]
    InvalidEscape { line: usize, message: String },
    #[error("line {line}: number out of range: {text}")]
    NumberOutOfRange { line: usize, text: String },
    #[error("line {line}: terms nested deeper than {max} levels", max = MAX_DEPTH)]
    TooDeep { line: usize },
    #[error("line {line}: top-level term is not a {{Key, Value}} tuple")]
    NotKeyValue { line: usize },
    #[error("required field `{0}` is missing")]
    MissingField(&'static str),
    #[error("line {line}: field `{field}` must be {expected}")]
    WrongType {
        line: usize,
        field: &'static str,
        expected: &'static str,
    },
    #[error("line {line}: field `{field}` appears more than once")]
    DuplicateField { line: usize, field: &'static str },
    /// `position` is the 1-based place of the entry within `requirements`.
    #[error("line {line}: requirement #{position}: {message}")]
    BadRequirement {
        line: usize,
        position: usize,
        message: String,
    },
    #[error("line {line}: dependency `{name}` is listed more than once")]
    DuplicateRequirement { line: usize, name: String },
}

type Result<T> = std::result::Result<T, MetadataError>;

/// One dependency of a release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HexRequirement {
    pub name: String,
    pub requirement: String,
    pub optional: bool,
    pub app: Option<String>,
    pub repository: Option<String>,
}

/// The fields of metadata.config that the registry needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HexMetadata {
    pub name: String,
    pub version: String,
    pub description: Option<String>,
    /// In file order.
    pub requirements: Vec<HexRequirement>,
}

/// Parses every `Term.` in `text`, in order.
pub fn parse_terms(text: &str) -> Result<Vec<Term>> {
    Ok(parse_located(text)?
        .into_iter()
        .map(|(_, term)| term)
        .collect())
}

/// Parses metadata.config and extracts name, version, description and
/// requirements. Unknown keys are ignored; known keys may appear only once,
/// because a duplicate would let two readers see different packages.
pub fn parse_metadata(text: &str) -> Result<HexMetadata> {
    let mut name: Option<String> = None;
    let mut version: Option<String> = None;
    let mut description: Option<Option<String>> = None;
    let mut requirements: Option<Vec<HexRequirement>> = None;

    for (line, term) in parse_located(text)? {
        let Term::Tuple(items) = term else {
            return Err(MetadataError::NotKeyValue { line });
        };
        let Ok([key, value]) = <[Term; 2]>::try_from(items) else {
            return Err(MetadataError::NotKeyValue { line });
        };
        // Hex keys are binaries; any other key is not a field we know.
        let Term::Binary(key) = key else { continue };
        match key.as_str() {
            "name" => {
                let v = required_string(&value, "name", line)?;
                set_once(&mut name, "name", line, v)?;
            }
            "version" => {
                let v = required_string(&value, "version", line)?;
                set_once(&mut version, "version", line, v)?;
            }
            "description" => {
                let v = optional_string(&value).ok_or(MetadataError::WrongType {
                    line,
                    field: "description",
                    expected: STRING_OR_NIL,
                })?;
                set_once(&mut description, "description", line, v)?;
            }
            "requirements" => {
                let v = parse_requirements(&value, line)?;
                set_once(&mut requirements, "requirements", line, v)?;
            }
            _ => {}
        }
    }

    Ok(HexMetadata {
        name: name.ok_or(MetadataError::MissingField("name"))?,
        version: version.ok_or(MetadataError::MissingField("version"))?,
        description: description.flatten(),
        // Releases without dependencies may omit the key entirely.
        requirements: requirements.unwrap_or_default(),
    })
}

const STRING: &str = "a binary or charlist string";
const STRING_OR_NIL: &str = "a binary or charlist string, or nil";

fn set_once<T>(slot: &mut Option<T>, field: &'static str, line: usize, value: T) -> Result<()> {
    if slot.is_some() {
        return Err(MetadataError::DuplicateField { line, field });
    }
    *slot = Some(value);
    Ok(())
}

fn required_string(term: &Term, field: &'static str, line: usize) -> Result<String> {
    string_ish(term).ok_or(MetadataError::WrongType {
        line,
        field,
        expected: STRING,
    })
}

/// Text from a binary or a charlist; both occur in the wild. A list of
/// integers is a charlist too: Erlang prints unprintable ones that way.
fn string_ish(term: &Term) -> Option<String> {
    match term {
        Term::Binary(s) | Term::String(s) => Some(s.clone()),
        Term::List(items) => items
            .iter()
            .map(|item| match item {
                Term::Integer(n) => u32::try_from(*n).ok().and_then(char::from_u32),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// `Some(None)` for Elixir's `nil` (or Erlang's `undefined`), which tools
/// write for an unset optional field; `None` when the type is wrong.
fn optional_string(term: &Term) -> Option<Option<String>> {
    match term {
        Term::Atom(a) if a == "nil" || a == "undefined" => Some(None),
        _ => string_ish(term).map(Some),
    }
}

/// Accepts every shape `requirements` has taken:
/// * `[{Name, Props}]` (hex_core, rebar3), Props a proplist or a map;
/// * `[Props]` with a `name` key inside (what `mix hex.build` writes);
/// * `#{Name => Props}`;
/// * `{Name, <<"~> 1.0">>}`, a bare requirement string.
fn parse_requirements(value: &Term, line: usize) -> Result<Vec<HexRequirement>> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut push = |req: HexRequirement, out: &mut Vec<HexRequirement>| {
        if !seen.insert(req.name.clone()) {
            return Err(MetadataError::DuplicateRequirement {
                line,
                name: req.name,
            });
        }
        out.push(req);
        Ok(())
    };
    match value {
        Term::List(items) => {
            for (index, item) in items.iter().enumerate() {
                let position = index + 1;
                let req = match item {
                    Term::Tuple(pair) => match pair.as_slice() {
                        [name, props] => named_requirement(name, props, line, position)?,
                        _ => return Err(bad(line, position, "tuple must be {Name, Properties}")),
                    },
                    Term::List(_) | Term::Map(_) => legacy_requirement(item, line, position)?,
                    _ => {
                        return Err(bad(
                            line,
                            position,
                            "expected {Name, Properties} or a property list with a name",
                        ))
                    }
                };
                push(req, &mut out)?;
            }
        }
        Term::Map(pairs) => {
            for (index, (name, props)) in pairs.iter().enumerate() {
                push(named_requirement(name, props, line, index + 1)?, &mut out)?;
            }
        }
        // `""` is the empty list in Erlang.
        Term::String(s) if s.is_empty() => {}
        _ => {
            return Err(MetadataError::WrongType {
                line,
                field: "requirements",
                expected: "a list or map of requirements",
            })
        }
    }
    Ok(out)
}

fn bad(line: usize, position: usize, message: impl Into<String>) -> MetadataError {
    MetadataError::BadRequirement {
        line,
        position,
        message: message.into(),
    }
}

fn named_requirement(
    name: &Term,
    props: &Term,
    line: usize,
    position: usize,
) -> Result<HexRequirement> {
    let name =
        string_ish(name).ok_or_else(|| bad(line, position, "dependency name must be a string"))?;
    let fields = match as_props(props) {
        Some(pairs) => read_fields(&pairs, line, position, &name)?,
        None => match string_ish(props) {
            // The bare `{Name, Requirement}` form.
            Some(requirement) => Fields {
                requirement: Some(requirement),
                ..Fields::default()
            },
            None => {
                return Err(bad(
                    line,
                    position,
                    format!("dependency `{name}`: properties must be a list or map"),
                ))
            }
        },
    };
    if let Some(inner) = &fields.name {
        // Two names for one entry would be read differently by different tools.
        if *inner != name {
            return Err(bad(
                line,
                position,
                format!("dependency `{name}` also names itself `{inner}`"),
            ));
        }
    }
    fields.finish(name, line, position)
}

fn legacy_requirement(item: &Term, line: usize, position: usize) -> Result<HexRequirement> {
    let pairs = as_props(item).ok_or_else(|| {
        bad(
            line,
            position,
            "property list must hold {Key, Value} tuples",
        )
    })?;
    let mut fields = read_fields(&pairs, line, position, "?")?;
    let name = fields
        .name
        .take()
        .ok_or_else(|| bad(line, position, "missing `name`"))?;
    fields.finish(name, line, position)
}

/// The pairs of a proplist (`[{K, V}]`) or a map; `None` for anything else.
fn as_props(term: &Term) -> Option<Vec<(&Term, &Term)>> {
    match term {
        Term::List(items) => items
            .iter()
            .map(|item| match item {
                Term::Tuple(pair) => match pair.as_slice() {
                    [k, v] => Some((k, v)),
                    _ => None,
                },
                _ => None,
            })
            .collect(),
        Term::Map(pairs) => Some(pairs.iter().map(|(k, v)| (k, v)).collect()),
        Term::String(s) if s.is_empty() => Some(Vec::new()),
        _ => None,
    }
}

#[derive(Default)]
struct Fields {
    name: Option<String>,
    requirement: Option<String>,
    optional: Option<bool>,
    app: Option<Option<String>>,
    repository: Option<Option<String>>,
}

fn read_fields(
    pairs: &[(&Term, &Term)],
    line: usize,
    position: usize,
    dep: &str,
) -> Result<Fields> {
    let mut f = Fields::default();
    let wrong = |key: &str, expected: &str| {
        bad(
            line,
            position,
            format!("dependency `{dep}`: `{key}` must be {expected}"),
        )
    };
    for (key, value) in pairs {
        let Some(key) = string_ish(key) else { continue };
        let fresh = match key.as_str() {
            "name" => {
                let v = string_ish(value).ok_or_else(|| wrong("name", STRING))?;
                f.name.replace(v).is_none()
            }
            "requirement" => {
                let v = string_ish(value).ok_or_else(|| wrong("requirement", STRING))?;
                f.requirement.replace(v).is_none()
            }
            "optional" => {
                let v = match value {
                    Term::Atom(a) if a == "true" => true,
                    Term::Atom(a) if a == "false" => false,
                    _ => return Err(wrong("optional", "true or false")),
                };
                f.optional.replace(v).is_none()
            }
            "app" => {
                let v = optional_string(value).ok_or_else(|| wrong("app", STRING_OR_NIL))?;
                f.app.replace(v).is_none()
            }
            "repository" => {
                let v = optional_string(value).ok_or_else(|| wrong("repository", STRING_OR_NIL))?;
                f.repository.replace(v).is_none()
            }
            _ => true,
        };
        if !fresh {
            return Err(bad(
                line,
                position,
                format!("dependency `{dep}`: key `{key}` appears more than once"),
            ));
        }
    }
    Ok(f)
}

impl Fields {
    fn finish(self, name: String, line: usize, position: usize) -> Result<HexRequirement> {
        let requirement = self.requirement.ok_or_else(|| {
            bad(
                line,
                position,
                format!("dependency `{name}`: missing `requirement`"),
            )
        })?;
        Ok(HexRequirement {
            name,
            requirement,
            // Early releases omit `optional`; absent means required.
            optional: self.optional.unwrap_or(false),
            app: self.app.flatten(),
            repository: self.repository.flatten(),
        })
    }
}

// ---------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    LBrace,
    RBrace,
    LBracket,
    RBracket,
    Comma,
    Dot,
    Arrow,
    Hash,
    OpenBin,
    CloseBin,
    Slash,
    Minus,
    Plus,
    /// Magnitude only: the sign is a separate token, and `-9223372036854775808`
    /// needs one more than `i64::MAX`.
    Int(u64),
    Float(f64),
    Atom(String),
    Str(String),
}

fn describe(tok: &Tok) -> String {
    let s = match tok {
        Tok::LBrace => "`{`",
        Tok::RBrace => "`}`",
        Tok::LBracket => "`[`",
        Tok::RBracket => "`]`",
        Tok::Comma => "`,`",
        Tok::Dot => "`.`",
        Tok::Arrow => "`=>`",
        Tok::Hash => "`#`",
        Tok::OpenBin => "`<<`",
        Tok::CloseBin => "`>>`",
        Tok::Slash => "`/`",
        Tok::Minus => "`-`",
        Tok::Plus => "`+`",
        Tok::Int(n) => return format!("integer {n}"),
        Tok::Float(f) => return format!("float {f}"),
        Tok::Atom(a) => return format!("atom `{}`", clip(a)),
        Tok::Str(_) => "a string",
    };
    s.to_string()
}

/// Keeps error messages short when the offending text is huge.
fn clip(s: &str) -> String {
    const LIMIT: usize = 40;
    if s.chars().count() <= LIMIT {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(LIMIT).collect();
        out.push('…');
        out
    }
}

/// Words erl_parse refuses as bare atoms; `file:consult` rejects them too.
const RESERVED: &[&str] = &[
    "after", "and", "andalso", "band", "begin", "bnot", "bor", "bsl", "bsr", "bxor", "case",
    "catch", "cond", "div", "else", "end", "fun", "if", "let", "maybe", "not", "of", "or",
    "orelse", "receive", "rem", "try", "when", "xor",
];

/// Erlang's whitespace: every control character, space, and Latin-1's
/// C1 controls plus no-break space.
fn is_whitespace(c: char) -> bool {
    c <= ' ' || ('\u{80}'..='\u{a0}').contains(&c)
}

fn is_atom_start(c: char) -> bool {
    c.is_ascii_lowercase() || (('ß'..='ÿ').contains(&c) && c != '÷')
}

fn is_atom_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || c == '_'
        || c == '@'
        || (('À'..='ÿ').contains(&c) && c != '×' && c != '÷')
}

fn is_variable_start(c: char) -> bool {
    c == '_' || c.is_ascii_uppercase() || (('À'..='Þ').contains(&c) && c != '×')
}

struct Lexer {
    chars: Vec<char>,
    pos: usize,
    line: usize,
}

impl Lexer {
    fn new(text: &str) -> Self {
        Lexer {
            chars: text.chars().collect(),
            pos: 0,
            line: 1,
        }
    }

    fn peek(&self) -> Option<char> {
        self.peek_at(0)
    }

    fn peek_at(&self, n: usize) -> Option<char> {
        self.chars.get(self.pos + n).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        if c == '\n' {
            self.line += 1;
        }
        Some(c)
    }

    fn syntax(&self, line: usize, message: impl Into<String>) -> MetadataError {
        MetadataError::Syntax {
            line,
            message: message.into(),
        }
    }

    /// The next token and the line it starts on, or `None` at end of input.
    fn next_token(&mut self) -> Result<Option<(Tok, usize)>> {
        loop {
            let Some(c) = self.peek() else {
                return Ok(None);
            };
            let line = self.line;
            if is_whitespace(c) {
                self.bump();
                continue;
            }
            if c == '%' {
                while self.peek().is_some_and(|c| c != '\n') {
                    self.bump();
                }
                continue;
            }
            let single = match c {
                '{' => Some(Tok::LBrace),
                '}' => Some(Tok::RBrace),
                '[' => Some(Tok::LBracket),
                ']' => Some(Tok::RBracket),
                ',' => Some(Tok::Comma),
                '.' => Some(Tok::Dot),
                '#' => Some(Tok::Hash),
                '/' => Some(Tok::Slash),
                '-' => Some(Tok::Minus),
                '+' => Some(Tok::Plus),
                _ => None,
            };
            if let Some(tok) = single {
                self.bump();
                return Ok(Some((tok, line)));
            }
            let tok = match c {
                '<' | '>' | '=' => {
                    self.bump();
                    let (second, tok) = match c {
                        '<' => ('<', Tok::OpenBin),
                        '>' => ('>', Tok::CloseBin),
                        _ => ('>', Tok::Arrow),
                    };
                    if self.peek() != Some(second) {
                        return Err(self.syntax(line, format!("unexpected character {c:?}")));
                    }
                    self.bump();
                    tok
                }
                '|' => {
                    return Err(self.syntax(line, "list tails (`|`) are not supported"));
                }
                '0'..='9' => self.number(line)?,
                '"' => Tok::Str(self.quoted('"', line)?),
                '\'' => {
                    let atom = self.quoted('\'', line)?;
                    self.check_atom_length(&atom, line)?;
                    Tok::Atom(atom)
                }
                '$' => {
                    self.bump();
                    let ch = match self.bump() {
                        None => return Err(self.syntax(line, "`$` at end of input")),
                        Some('\\') => self
                            .escape()?
                            .ok_or_else(|| self.syntax(line, "`$\\` at end of input"))?,
                        Some(ch) => ch,
                    };
                    Tok::Int(u64::from(u32::from(ch)))
                }
                c if is_atom_start(c) => {
                    let mut atom = String::new();
                    while let Some(c) = self.peek().filter(|&c| is_atom_char(c)) {
                        atom.push(c);
                        self.bump();
                    }
                    self.check_atom_length(&atom, line)?;
                    if RESERVED.contains(&atom.as_str()) {
                        return Err(self.syntax(
                            line,
                            format!("reserved word `{atom}` must be quoted to be an atom"),
                        ));
                    }
                    Tok::Atom(atom)
                }
                c if is_variable_start(c) => {
                    let mut name = String::new();
                    while let Some(c) = self.peek().filter(|&c| is_atom_char(c)) {
                        name.push(c);
                        self.bump();
                    }
                    return Err(self.syntax(
                        line,
                        format!(
                            "variable `{}` is not allowed: metadata is literal data",
                            clip(&name)
                        ),
                    ));
                }
                other => {
                    return Err(self.syntax(line, format!("unexpected character {other:?}")));
                }
            };
            return Ok(Some((tok, line)));
        }
    }

    fn check_atom_length(&self, atom: &str, line: usize) -> Result<()> {
        if atom.chars().count() > MAX_ATOM_CHARS {
            return Err(self.syntax(
                line,
                format!("atom longer than {MAX_ATOM_CHARS} characters"),
            ));
        }
        Ok(())
    }

    /// Digits of `radix`, allowing single `_` separators between digits
    /// (`1_000`); the separators are dropped.
    fn digits(&mut self, radix: u32) -> String {
        let mut out = String::new();
        loop {
            match self.peek() {
                Some(c) if c.is_digit(radix) => {
                    out.push(c);
                    self.bump();
                }
                Some('_')
                    if !out.is_empty() && self.peek_at(1).is_some_and(|c| c.is_digit(radix)) =>
                {
                    self.bump();
                }
                _ => return out,
            }
        }
    }

    fn number(&mut self, line: usize) -> Result<Tok> {
        let out_of_range = |text: &str| MetadataError::NumberOutOfRange {
            line,
            text: clip(text),
        };
        let whole = self.digits(10);
        if self.peek() == Some('#') {
            // `Base#Digits`, e.g. 16#ff.
            let base = whole
                .parse::<u32>()
                .ok()
                .filter(|b| (2..=36).contains(b))
                .ok_or_else(|| self.syntax(line, format!("invalid base {}", clip(&whole))))?;
            self.bump();
            let digits = self.digits(base);
            if digits.is_empty() {
                return Err(self.syntax(line, format!("missing digits after {base}#")));
            }
            if let Some(c) = self.peek().filter(|c| c.is_ascii_alphanumeric()) {
                return Err(self.syntax(line, format!("digit {c:?} is not valid in base {base}")));
            }
            return u64::from_str_radix(&digits, base)
                .map(Tok::Int)
                .map_err(|_| out_of_range(&format!("{base}#{digits}")));
        }
        // A `.` is a decimal point only when a digit follows; otherwise it
        // is the terminator (`{<<"n">>,1}.` vs `1.5`).
        if self.peek() == Some('.') && self.peek_at(1).is_some_and(|c| c.is_ascii_digit()) {
            self.bump();
            let fraction = self.digits(10);
            let mut text = format!("{whole}.{fraction}");
            if matches!(self.peek(), Some('e' | 'E')) {
                let signed = matches!(self.peek_at(1), Some('+' | '-'));
                let first_digit = if signed { 2 } else { 1 };
                if self
                    .peek_at(first_digit)
                    .is_some_and(|c| c.is_ascii_digit())
                {
                    self.bump();
                    text.push('e');
                    if signed {
                        if let Some(sign) = self.bump() {
                            text.push(sign);
                        }
                    }
                    text.push_str(&self.digits(10));
                }
            }
            return match text.parse::<f64>() {
                Ok(f) if f.is_finite() => Ok(Tok::Float(f)),
                _ => Err(out_of_range(&text)),
            };
        }
        whole
            .parse::<u64>()
            .map(Tok::Int)
            .map_err(|_| out_of_range(&whole))
    }

    /// A `"string"` or `'atom'` body with escapes decoded.
    fn quoted(&mut self, quote: char, start_line: usize) -> Result<String> {
        let unterminated = || {
            if quote == '"' {
                MetadataError::UnterminatedString { line: start_line }
            } else {
                MetadataError::UnterminatedAtom { line: start_line }
            }
        };
        self.bump();
        let mut out = String::new();
        loop {
            match self.bump() {
                None => return Err(unterminated()),
                Some(c) if c == quote => return Ok(out),
                Some('\\') => out.push(self.escape()?.ok_or_else(unterminated)?),
                Some(c) => out.push(c),
            }
        }
    }

    /// Decodes the escape after a `\`; `Ok(None)` if the input ends first.
    fn escape(&mut self) -> Result<Option<char>> {
        let line = self.line;
        let invalid = |message: String| MetadataError::InvalidEscape { line, message };
        let Some(c) = self.bump() else {
            return Ok(None);
        };
        let decoded = match c {
            '0'..='7' => {
                // One to three octal digits: \0, \12, \101.
                let mut value = c.to_digit(8).unwrap_or(0);
                for _ in 0..2 {
                    match self.peek().and_then(|d| d.to_digit(8)) {
                        Some(d) => {
                            value = value * 8 + d;
                            self.bump();
                        }
                        None => break,
                    }
                }
                return Ok(char::from_u32(value));
            }
            'x' if self.peek() == Some('{') => {
                self.bump();
                let mut value: u32 = 0;
                let mut count = 0;
                loop {
                    match self.bump() {
                        None => return Ok(None),
                        Some('}') => break,
                        Some(d) => {
                            let digit = d
                                .to_digit(16)
                                .ok_or_else(|| invalid(format!("{d:?} in \\x{{...}}")))?;
                            value = value
                                .checked_mul(16)
                                .and_then(|v| v.checked_add(digit))
                                .ok_or_else(|| invalid("\\x{...} value too large".into()))?;
                            count += 1;
                        }
                    }
                }
                if count == 0 {
                    return Err(invalid("empty \\x{}".into()));
                }
                return char::from_u32(value)
                    .map(Some)
                    .ok_or_else(|| invalid(format!("U+{value:X} is not a Unicode scalar value")));
            }
            'x' => {
                let mut value = 0;
                for _ in 0..2 {
                    let digit = self
                        .peek()
                        .and_then(|d| d.to_digit(16))
                        .ok_or_else(|| invalid("\\x needs two hex digits".into()))?;
                    value = value * 16 + digit;
                    self.bump();
                }
                return Ok(char::from_u32(value));
            }
            '^' => {
                // Control character: \^a is 1, \^[ is ESC.
                let Some(ctl) = self.bump() else {
                    return Ok(None);
                };
                return Ok(char::from_u32(u32::from(ctl) & 31));
            }
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'v' => '\u{0b}',
            'b' => '\u{08}',
            'f' => '\u{0c}',
            'e' => '\u{1b}',
            's' => ' ',
            'd' => '\u{7f}',
            // Erlang keeps any other escaped character as itself: \" \' \\ \z.
            other => other,
        };
        Ok(Some(decoded))
    }
}

// ---------------------------------------------------------------------------
// Parser

struct Parser {
    lexer: Lexer,
    peeked: Option<(Tok, usize)>,
    /// Line of the last token consumed, for errors at end of input.
    last_line: usize,
}

/// Parses the whole text, keeping the line each top-level term starts on.
fn parse_located(text: &str) -> Result<Vec<(usize, Term)>> {
    let mut parser = Parser {
        lexer: Lexer::new(text),
        peeked: None,
        last_line: 1,
    };
    let mut out = Vec::new();
    while let Some(line) = parser.peek_line()? {
        let term = parser.term(0)?;
        match parser.next()? {
            Some((Tok::Dot, _)) => out.push((line, term)),
            Some((_, other_line)) => {
                return Err(MetadataError::MissingTerminator { line: other_line })
            }
            None => {
                return Err(MetadataError::MissingTerminator {
                    line: parser.last_line,
                })
            }
        }
    }
    Ok(out)
}

impl Parser {
    fn fill(&mut self) -> Result<()> {
        if self.peeked.is_none() {
            self.peeked = self.lexer.next_token()?;
        }
        Ok(())
    }

    fn peek(&mut self) -> Result<Option<&Tok>> {
        self.fill()?;
        Ok(self.peeked.as_ref().map(|(tok, _)| tok))
    }

    fn peek_line(&mut self) -> Result<Option<usize>> {
        self.fill()?;
        Ok(self.peeked.as_ref().map(|(_, line)| *line))
    }

    fn next(&mut self) -> Result<Option<(Tok, usize)>> {
        self.fill()?;
        let next = self.peeked.take();
        if let Some((_, line)) = &next {
            self.last_line = *line;
        }
        Ok(next)
    }

    /// Consumes the next token if it is `tok`.
    fn eat(&mut self, tok: &Tok) -> Result<bool> {
        if self.peek()? == Some(tok) {
            self.next()?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Errors with `Unclosed` if the input ends inside a container.
    fn more(&mut self, opener: &'static str, open_line: usize) -> Result<()> {
        match self.peek()? {
            Some(_) => Ok(()),
            None => Err(MetadataError::Unclosed {
                line: open_line,
                opener,
            }),
        }
    }

    fn unexpected(tok: &Tok, line: usize, wanted: &str) -> MetadataError {
        MetadataError::Syntax {
            line,
            message: format!("expected {wanted}, found {}", describe(tok)),
        }
    }

    /// One term; `depth` is how many containers enclose it.
    fn term(&mut self, depth: usize) -> Result<Term> {
        let Some((tok, line)) = self.next()? else {
            return Err(MetadataError::Syntax {
                line: self.last_line,
                message: "unexpected end of input".into(),
            });
        };
        let inner = depth + 1;
        if matches!(tok, Tok::LBrace | Tok::LBracket | Tok::Hash) && inner > MAX_DEPTH {
            return Err(MetadataError::TooDeep { line });
        }
        match tok {
            Tok::LBrace => Ok(Term::Tuple(self.sequence(Tok::RBrace, "{", line, inner)?)),
            Tok::LBracket => Ok(Term::List(self.sequence(
                Tok::RBracket,
                "[",
                line,
                inner,
            )?)),
            Tok::Hash => {
                if !self.eat(&Tok::LBrace)? {
                    return Err(MetadataError::Syntax {
                        line,
                        message: "`#` must start a map `#{...}`; records are not allowed".into(),
                    });
                }
                Ok(Term::Map(self.map(line, inner)?))
            }
            Tok::OpenBin => Ok(Term::Binary(self.binary(line)?)),
            Tok::Str(s) => Ok(Term::String(self.adjacent_strings(s)?)),
            Tok::Atom(a) => Ok(Term::Atom(a)),
            Tok::Int(n) => Ok(Term::Integer(to_i64(n, false, line)?)),
            Tok::Float(f) => Ok(Term::Float(f)),
            Tok::Minus | Tok::Plus => {
                let negative = tok == Tok::Minus;
                match self.next()? {
                    Some((Tok::Int(n), _)) => Ok(Term::Integer(to_i64(n, negative, line)?)),
                    Some((Tok::Float(f), _)) => Ok(Term::Float(if negative { -f } else { f })),
                    Some((other, l)) => Err(Self::unexpected(&other, l, "a number after the sign")),
                    None => Err(MetadataError::Syntax {
                        line,
                        message: "sign at end of input".into(),
                    }),
                }
            }
            other => Err(Self::unexpected(&other, line, "a term")),
        }
    }

    /// Elements of a tuple or list up to and including `close`.
    fn sequence(
        &mut self,
        close: Tok,
        opener: &'static str,
        open_line: usize,
        depth: usize,
    ) -> Result<Vec<Term>> {
        let mut items = Vec::new();
        self.more(opener, open_line)?;
        if self.eat(&close)? {
            return Ok(items);
        }
        loop {
            self.more(opener, open_line)?;
            items.push(self.term(depth)?);
            match self.next()? {
                Some((Tok::Comma, _)) => {}
                Some((tok, _)) if tok == close => return Ok(items),
                Some((tok, line)) => {
                    let wanted = format!("`,` or {}", describe(&close));
                    return Err(Self::unexpected(&tok, line, &wanted));
                }
                None => {
                    return Err(MetadataError::Unclosed {
                        line: open_line,
                        opener,
                    })
                }
            }
        }
    }

    /// Pairs of a map after `#{`, up to and including `}`.
    fn map(&mut self, open_line: usize, depth: usize) -> Result<Vec<(Term, Term)>> {
        const OPENER: &str = "#{";
        let mut pairs = Vec::new();
        self.more(OPENER, open_line)?;
        if self.eat(&Tok::RBrace)? {
            return Ok(pairs);
        }
        loop {
            self.more(OPENER, open_line)?;
            let key = self.term(depth)?;
            match self.next()? {
                Some((Tok::Arrow, _)) => {}
                Some((tok, line)) => return Err(Self::unexpected(&tok, line, "`=>`")),
                None => {
                    return Err(MetadataError::Unclosed {
                        line: open_line,
                        opener: OPENER,
                    })
                }
            }
            self.more(OPENER, open_line)?;
            let value = self.term(depth)?;
            pairs.push((key, value));
            match self.next()? {
                Some((Tok::Comma, _)) => {}
                Some((Tok::RBrace, _)) => return Ok(pairs),
                Some((tok, line)) => return Err(Self::unexpected(&tok, line, "`,` or `}`")),
                None => {
                    return Err(MetadataError::Unclosed {
                        line: open_line,
                        opener: OPENER,
                    })
                }
            }
        }
    }

    /// Erlang joins adjacent string literals: `"a" "b"` is `"ab"`.
    fn adjacent_strings(&mut self, mut text: String) -> Result<String> {
        while let Some(Tok::Str(_)) = self.peek()? {
            if let Some((Tok::Str(more), _)) = self.next()? {
                text.push_str(&more);
            }
        }
        Ok(text)
    }

    /// Segments of a binary after `<<`, up to and including `>>`.
    fn binary(&mut self, open_line: usize) -> Result<String> {
        const OPENER: &str = "<<";
        let mut bytes = Vec::new();
        self.more(OPENER, open_line)?;
        if self.eat(&Tok::CloseBin)? {
            return Ok(String::new());
        }
        loop {
            self.more(OPENER, open_line)?;
            let Some((tok, line)) = self.next()? else {
                return Err(MetadataError::Unclosed {
                    line: open_line,
                    opener: OPENER,
                });
            };
            let utf8_then = |parser: &mut Self| -> Result<bool> {
                if !parser.eat(&Tok::Slash)? {
                    return Ok(false);
                }
                match parser.next()? {
                    Some((Tok::Atom(a), _)) if a == "utf8" => Ok(true),
                    Some((other, l)) => Err(Self::unexpected(&other, l, "`utf8` after `/`")),
                    None => Err(MetadataError::Unclosed {
                        line: open_line,
                        opener: OPENER,
                    }),
                }
            };
            match tok {
                Tok::Str(s) => {
                    let text = self.adjacent_strings(s)?;
                    if utf8_then(self)? {
                        bytes.extend_from_slice(text.as_bytes());
                    } else {
                        // Without /utf8 each character is one byte.
                        for c in text.chars() {
                            let byte =
                                u8::try_from(u32::from(c)).map_err(|_| MetadataError::Syntax {
                                    line,
                                    message: format!(
                                        "character U+{:04X} does not fit in a byte; \
                                         the segment needs /utf8",
                                        u32::from(c)
                                    ),
                                })?;
                            bytes.push(byte);
                        }
                    }
                }
                Tok::Int(n) => {
                    if utf8_then(self)? {
                        let c =
                            u32::try_from(n)
                                .ok()
                                .and_then(char::from_u32)
                                .ok_or_else(|| MetadataError::Syntax {
                                    line,
                                    message: format!("{n} is not a Unicode scalar value"),
                                })?;
                        let mut buf = [0; 4];
                        bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    } else {
                        let byte = u8::try_from(n).map_err(|_| MetadataError::Syntax {
                            line,
                            message: format!("byte value {n} is outside 0..=255"),
                        })?;
                        bytes.push(byte);
                    }
                }
                other => {
                    return Err(Self::unexpected(
                        &other,
                        line,
                        "a string or integer binary segment",
                    ))
                }
            }
            match self.next()? {
                Some((Tok::Comma, _)) => {}
                Some((Tok::CloseBin, _)) => break,
                Some((tok, line)) => return Err(Self::unexpected(&tok, line, "`,` or `>>`")),
                None => {
                    return Err(MetadataError::Unclosed {
                        line: open_line,
                        opener: OPENER,
                    })
                }
            }
        }
        // Binaries are bytes; the ones Hex writes are UTF-8. Anything else is
        // read as Latin-1, as hex_core falls back to for the whole file.
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => e.into_bytes().into_iter().map(char::from).collect(),
        })
    }
}

fn to_i64(magnitude: u64, negative: bool, line: usize) -> Result<i64> {
    let value = if negative {
        -i128::from(magnitude)
    } else {
        i128::from(magnitude)
    };
    i64::try_from(value).map_err(|_| MetadataError::NumberOutOfRange {
        line,
        text: value.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Term {
        let mut terms = parse_terms(text).expect("parses");
        assert_eq!(terms.len(), 1, "expected exactly one term in {text:?}");
        terms.remove(0)
    }

    fn bin(s: &str) -> Term {
        Term::Binary(s.to_string())
    }

    fn string(s: &str) -> Term {
        Term::String(s.to_string())
    }

    fn atom(s: &str) -> Term {
        Term::Atom(s.to_string())
    }

    fn syntax_line(result: Result<Vec<Term>>) -> usize {
        match result {
            Err(MetadataError::Syntax { line, .. }) => line,
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }

    fn req(name: &str, requirement: &str, optional: bool, app: Option<&str>) -> HexRequirement {
        HexRequirement {
            name: name.into(),
            requirement: requirement.into(),
            optional,
            app: app.map(Into::into),
            repository: None,
        }
    }

    /// Shaped like what `mix hex.build` writes (jason-style), including a
    /// description that io_lib_pretty printed as bytes because it holds
    /// characters outside Latin-1.
    const MIX_METADATA: &str = r#"{<<"links">>,[{<<"GitHub">>,<<"https://github.com/michalmuskala/jason">>}]}.
{<<"name">>,<<"jason">>}.
{<<"version">>,<<"1.4.4">>}.
{<<"description">>,
 <<65,32,226,156,147,32,74,83,79,78,
   32,112,97,114,115,101,114>>}.
{<<"elixir">>,<<"~> 1.4">>}.
{<<"app">>,<<"jason">>}.
{<<"licenses">>,[<<"Apache-2.0">>]}.
{<<"requirements">>,
 [[{<<"name">>,<<"decimal">>},
   {<<"app">>,<<"decimal">>},
   {<<"optional">>,true},
   {<<"requirement">>,<<"~> 1.0 or ~> 2.0">>},
   {<<"repository">>,<<"hexpm">>}],
  [{<<"name">>,<<"telemetry">>},
   {<<"app">>,<<"telemetry">>},
   {<<"optional">>,false},
   {<<"requirement">>,<<"~> 0.4 or ~> 1.0">>},
   {<<"repository">>,<<"hexpm">>}]]}.
{<<"files">>,
 [<<"lib">>,<<"lib/jason.ex">>,<<"mix.exs">>,<<"README.md">>,<<"LICENSE">>,
  <<"CHANGELOG.md">>]}.
{<<"build_tools">>,[<<"mix">>]}.
"#;

    #[test]
    fn realistic_mix_metadata() {
        let meta = parse_metadata(MIX_METADATA).expect("parses");
        assert_eq!(meta.name, "jason");
        assert_eq!(meta.version, "1.4.4");
        assert_eq!(meta.description.as_deref(), Some("A ✓ JSON parser"));
        assert_eq!(
            meta.requirements,
            vec![
                HexRequirement {
                    name: "decimal".into(),
                    requirement: "~> 1.0 or ~> 2.0".into(),
                    optional: true,
                    app: Some("decimal".into()),
                    repository: Some("hexpm".into()),
                },
                HexRequirement {
                    name: "telemetry".into(),
                    requirement: "~> 0.4 or ~> 1.0".into(),
                    optional: false,
                    app: Some("telemetry".into()),
                    repository: Some("hexpm".into()),
                },
            ]
        );
    }

    #[test]
    fn realistic_mix_metadata_terms() {
        let terms = parse_terms(MIX_METADATA).expect("parses");
        assert_eq!(terms.len(), 10);
        assert_eq!(
            terms[8],
            Term::Tuple(vec![
                bin("files"),
                Term::List(vec![
                    bin("lib"),
                    bin("lib/jason.ex"),
                    bin("mix.exs"),
                    bin("README.md"),
                    bin("LICENSE"),
                    bin("CHANGELOG.md"),
                ]),
            ])
        );
        assert_eq!(
            terms[9],
            Term::Tuple(vec![bin("build_tools"), Term::List(vec![bin("mix")])])
        );
    }

    /// The output of hex_core's encoder (io_lib_pretty, utf8), which is what
    /// rebar3 publishes: `{Name, Props}` requirements, keys sorted.
    #[test]
    fn hex_core_requirements_shape() {
        let text = r#"{<<"app">>,<<"plug">>}.
{<<"build_tools">>,[<<"mix">>]}.
{<<"description">>,<<"Compose web applications with functions"/utf8>>}.
{<<"name">>,<<"plug">>}.
{<<"requirements">>,
 [{<<"mime">>,
   [{<<"app">>,<<"mime">>},
    {<<"optional">>,false},
    {<<"repository">>,<<"hexpm">>},
    {<<"requirement">>,<<"~> 1.0 or ~> 2.0">>}]},
  {<<"plug_crypto">>,
   [{<<"requirement">>,<<"~> 1.1">>},
    {<<"optional">>,true},
    {<<"app">>,<<"plug_crypto">>}]}]}.
{<<"version">>,<<"1.14.0">>}.
"#;
        let meta = parse_metadata(text).expect("parses");
        assert_eq!(meta.name, "plug");
        assert_eq!(meta.version, "1.14.0");
        assert_eq!(
            meta.description.as_deref(),
            Some("Compose web applications with functions")
        );
        let mut mime = req("mime", "~> 1.0 or ~> 2.0", false, Some("mime"));
        mime.repository = Some("hexpm".into());
        assert_eq!(
            meta.requirements,
            vec![
                mime,
                req("plug_crypto", "~> 1.1", true, Some("plug_crypto")),
            ]
        );
    }

    #[test]
    fn requirements_as_map_of_maps() {
        let text = r#"{<<"name">>,<<"a">>}. {<<"version">>,<<"1.0.0">>}.
{<<"requirements">>, #{<<"zeta">> => #{<<"app">> => <<"zeta">>,
    <<"optional">> => false, <<"requirement">> => <<">= 0.0.0">>},
  <<"alpha">> => [{<<"requirement">>, <<"~> 2.0">>}, {<<"repository">>, <<"private">>}]}}.
"#;
        let meta = parse_metadata(text).expect("parses");
        let mut alpha = req("alpha", "~> 2.0", false, None);
        alpha.repository = Some("private".into());
        // File order, not sorted.
        assert_eq!(
            meta.requirements,
            vec![req("zeta", ">= 0.0.0", false, Some("zeta")), alpha]
        );
    }

    #[test]
    fn requirements_legacy_list_of_maps_and_charlists() {
        let text = r#"{<<"name">>,"a"}. {<<"version">>,"1.0.0"}.
{<<"requirements">>, [#{<<"name">> => "cowboy", <<"requirement">> => "~> 2.9",
                        <<"optional">> => true, <<"app">> => nil}]}.
"#;
        let meta = parse_metadata(text).expect("parses");
        assert_eq!(meta.name, "a");
        assert_eq!(meta.version, "1.0.0");
        assert_eq!(meta.requirements, vec![req("cowboy", "~> 2.9", true, None)]);
    }

    #[test]
    fn requirement_as_bare_string() {
        let text = r#"{<<"name">>,<<"a">>}.{<<"version">>,<<"1">>}.
{<<"requirements">>,[{<<"poison">>,<<"~> 1.0">>}]}."#;
        let meta = parse_metadata(text).expect("parses");
        assert_eq!(
            meta.requirements,
            vec![req("poison", "~> 1.0", false, None)]
        );
    }

    #[test]
    fn requirements_absent_or_empty() {
        for reqs in [
            "",
            "{<<\"requirements\">>,[]}.",
            "{<<\"requirements\">>,#{}}.",
        ] {
            let text = format!("{{<<\"name\">>,<<\"a\">>}}. {{<<\"version\">>,<<\"1\">>}}. {reqs}");
            let meta = parse_metadata(&text).expect("parses");
            assert_eq!(meta.requirements, vec![], "for {reqs:?}");
        }
    }

    #[test]
    fn requirements_wrong_type() {
        let text =
            "{<<\"name\">>,<<\"a\">>}.\n{<<\"version\">>,<<\"1\">>}.\n{<<\"requirements\">>,true}.";
        assert_eq!(
            parse_metadata(text),
            Err(MetadataError::WrongType {
                line: 3,
                field: "requirements",
                expected: "a list or map of requirements",
            })
        );
    }

    fn with_reqs(reqs: &str) -> Result<HexMetadata> {
        parse_metadata(&format!(
            "{{<<\"name\">>,<<\"a\">>}}.\n{{<<\"version\">>,<<\"1\">>}}.\n{{<<\"requirements\">>,{reqs}}}.\n"
        ))
    }

    fn bad_requirement(result: Result<HexMetadata>) -> (usize, usize, String) {
        match result {
            Err(MetadataError::BadRequirement {
                line,
                position,
                message,
            }) => (line, position, message),
            other => panic!("expected BadRequirement, got {other:?}"),
        }
    }

    #[test]
    fn requirement_errors() {
        let (line, position, message) =
            bad_requirement(with_reqs("[{<<\"x\">>,[{<<\"app\">>,<<\"x\">>}]}]"));
        assert_eq!((line, position), (3, 1));
        assert!(message.contains("missing `requirement`"), "{message}");

        let (_, position, message) = bad_requirement(with_reqs(
            "[{<<\"x\">>,<<\"1\">>},{<<\"y\">>,[{<<\"requirement\">>,<<\"1\">>},{<<\"optional\">>,<<\"no\">>}]}]",
        ));
        assert_eq!(position, 2);
        assert!(
            message.contains("`optional` must be true or false"),
            "{message}"
        );

        let (_, _, message) =
            bad_requirement(with_reqs("[[{<<\"requirement\">>,<<\"~> 1.0\">>}]]"));
        assert!(message.contains("missing `name`"), "{message}");

        let (_, _, message) = bad_requirement(with_reqs(
            "[{<<\"x\">>,[{<<\"requirement\">>,<<\"1\">>},{<<\"requirement\">>,<<\"2\">>}]}]",
        ));
        assert!(message.contains("more than once"), "{message}");

        let (_, _, message) = bad_requirement(with_reqs("[{x,<<\"1\">>}]"));
        assert!(message.contains("name must be a string"), "{message}");

        let (_, _, message) = bad_requirement(with_reqs("[{<<\"x\">>,42}]"));
        assert!(message.contains("properties must be"), "{message}");

        let (_, _, message) = bad_requirement(with_reqs("[42]"));
        assert!(message.contains("expected {Name, Properties}"), "{message}");

        let (_, _, message) = bad_requirement(with_reqs(
            "[{<<\"x\">>,[{<<\"name\">>,<<\"y\">>},{<<\"requirement\">>,<<\"1\">>}]}]",
        ));
        assert!(message.contains("also names itself `y`"), "{message}");

        let (_, _, message) = bad_requirement(with_reqs(
            "[{<<\"x\">>,[{<<\"requirement\">>,<<\"1\">>},{<<\"app\">>,42}]}]",
        ));
        assert!(message.contains("`app` must be"), "{message}");
    }

    #[test]
    fn duplicate_requirement() {
        assert_eq!(
            with_reqs("[{<<\"x\">>,<<\"1\">>},[{<<\"name\">>,<<\"x\">>},{<<\"requirement\">>,<<\"2\">>}]]"),
            Err(MetadataError::DuplicateRequirement {
                line: 3,
                name: "x".into()
            })
        );
    }

    #[test]
    fn requirement_ignores_unknown_keys_and_matching_inner_name() {
        let meta = with_reqs(
            "[{<<\"x\">>,[{<<\"name\">>,<<\"x\">>},{<<\"future\">>,[1,2]},{<<\"requirement\">>,<<\"1\">>},{7,8}]}]",
        )
        .expect("parses");
        assert_eq!(meta.requirements, vec![req("x", "1", false, None)]);
    }

    #[test]
    fn missing_name_and_version() {
        assert_eq!(
            parse_metadata("{<<\"version\">>,<<\"1.0.0\">>}."),
            Err(MetadataError::MissingField("name"))
        );
        assert_eq!(
            parse_metadata("{<<\"name\">>,<<\"a\">>}."),
            Err(MetadataError::MissingField("version"))
        );
        assert_eq!(parse_metadata(""), Err(MetadataError::MissingField("name")));
    }

    #[test]
    fn wrong_field_types() {
        assert_eq!(
            parse_metadata("{<<\"name\">>,foo}.\n{<<\"version\">>,<<\"1\">>}."),
            Err(MetadataError::WrongType {
                line: 1,
                field: "name",
                expected: STRING,
            })
        );
        assert_eq!(
            parse_metadata("{<<\"name\">>,<<\"a\">>}.\n{<<\"version\">>,1}."),
            Err(MetadataError::WrongType {
                line: 2,
                field: "version",
                expected: STRING,
            })
        );
        assert_eq!(
            parse_metadata("\n\n{<<\"description\">>,[a]}.{<<\"name\">>,<<\"a\">>}."),
            Err(MetadataError::WrongType {
                line: 3,
                field: "description",
                expected: STRING_OR_NIL,
            })
        );
    }

    #[test]
    fn description_optional_and_nil() {
        let base = "{<<\"name\">>,<<\"a\">>}.{<<\"version\">>,<<\"1\">>}.";
        assert_eq!(parse_metadata(base).expect("parses").description, None);
        let nil = format!("{base}{{<<\"description\">>,nil}}.");
        assert_eq!(parse_metadata(&nil).expect("parses").description, None);
        let text = format!("{base}{{<<\"description\">>,\"chars\"}}.");
        assert_eq!(
            parse_metadata(&text)
                .expect("parses")
                .description
                .as_deref(),
            Some("chars")
        );
    }

    #[test]
    fn charlist_as_integer_list_is_a_string() {
        let text = "{<<\"name\">>,[104,105]}.{<<\"version\">>,<<\"1\">>}.";
        assert_eq!(parse_metadata(text).expect("parses").name, "hi");
    }

    #[test]
    fn not_key_value() {
        assert_eq!(
            parse_metadata("{<<\"name\">>,<<\"a\">>}.\n{a,b,c}."),
            Err(MetadataError::NotKeyValue { line: 2 })
        );
        assert_eq!(
            parse_metadata("\n\n[<<\"name\">>,<<\"a\">>]."),
            Err(MetadataError::NotKeyValue { line: 3 })
        );
    }

    #[test]
    fn unknown_and_non_binary_keys_ignored() {
        let text = r#"{<<"extra">>,#{<<"anything">> => [1.5, {deep, [x]}]}}.
{name, <<"ignored">>}.
{"version", <<"ignored">>}.
{<<"name">>,<<"a">>}.
{<<"version">>,<<"2.0.0-rc.1">>}."#;
        let meta = parse_metadata(text).expect("parses");
        assert_eq!(meta.name, "a");
        assert_eq!(meta.version, "2.0.0-rc.1");
    }

    #[test]
    fn duplicate_fields_rejected() {
        assert_eq!(
            parse_metadata("{<<\"name\">>,<<\"a\">>}.\n{<<\"name\">>,<<\"b\">>}."),
            Err(MetadataError::DuplicateField {
                line: 2,
                field: "name",
            })
        );
        assert_eq!(
            parse_metadata(
                "{<<\"name\">>,<<\"a\">>}.{<<\"version\">>,<<\"1\">>}.\n\n{<<\"requirements\">>,[]}.{<<\"requirements\">>,[]}."
            ),
            Err(MetadataError::DuplicateField {
                line: 3,
                field: "requirements",
            })
        );
    }

    #[test]
    fn metadata_propagates_syntax_errors() {
        assert_eq!(
            parse_metadata("{<<\"name\">>,<<\"a\">>}.\n{<<\"version\">>,<<\"1\">>"),
            Err(MetadataError::Unclosed {
                line: 2,
                opener: "{"
            })
        );
    }

    // --- terms ---

    #[test]
    fn binary_forms() {
        assert_eq!(one("<<\"abc\">>."), bin("abc"));
        assert_eq!(one("<<>>."), bin(""));
        assert_eq!(one("<< >>."), bin(""));
        assert_eq!(one("<<\"héllo ✓\"/utf8>>."), bin("héllo ✓"));
        assert_eq!(one("<< \"a\" / utf8 , \"b\" >>."), bin("ab"));
        assert_eq!(one("<<\"a\" \"b\"\n  \"c\">>."), bin("abc"));
        assert_eq!(one("<<104,105>>."), bin("hi"));
        assert_eq!(one("<<$h, \"i\", 10>>."), bin("hi\n"));
        assert_eq!(one("<<10003/utf8>>."), bin("✓"));
        assert_eq!(one("<<\"\\x{2713}\"/utf8>>."), bin("✓"));
        assert_eq!(one("<<\"\">>."), bin(""));
    }

    #[test]
    fn binary_bytes_not_utf8_read_as_latin1() {
        // A Latin-1 binary, as io_lib_pretty prints one: é is one byte.
        assert_eq!(one("<<\"latin é\">>."), bin("latin é"));
        assert_eq!(one("<<233>>."), bin("é"));
        // Valid UTF-8 bytes stay UTF-8.
        assert_eq!(one("<<195,169>>."), bin("é"));
        assert_eq!(one("<<\"ÿþ\">>."), bin("ÿþ"));
    }

    #[test]
    fn binary_segment_errors() {
        assert_eq!(syntax_line(parse_terms("\n<<\"日本\">>.")), 2);
        assert_eq!(syntax_line(parse_terms("<<256>>.")), 1);
        assert_eq!(syntax_line(parse_terms("<<\"a\"/utf16>>.")), 1);
        assert_eq!(syntax_line(parse_terms("<<\"a\"/binary>>.")), 1);
        assert_eq!(syntax_line(parse_terms("<<[1]>>.")), 1);
        assert_eq!(syntax_line(parse_terms("<<-1>>.")), 1);
        assert_eq!(syntax_line(parse_terms("<<\"a\" \"b\">>>.")), 1);
        assert_eq!(syntax_line(parse_terms("<<55296/utf8>>.")), 1);
        assert_eq!(syntax_line(parse_terms("<<\"a\",>>.")), 1);
        assert_eq!(syntax_line(parse_terms("<<\"a\" 1>>.")), 1);
    }

    #[test]
    fn every_escape() {
        let cases: &[(&str, &str)] = &[
            (r#""\n""#, "\n"),
            (r#""\r""#, "\r"),
            (r#""\t""#, "\t"),
            (r#""\v""#, "\u{0b}"),
            (r#""\b""#, "\u{08}"),
            (r#""\f""#, "\u{0c}"),
            (r#""\e""#, "\u{1b}"),
            (r#""\s""#, " "),
            (r#""\d""#, "\u{7f}"),
            (r#""\"""#, "\""),
            (r#""\'""#, "'"),
            (r#""\\""#, "\\"),
            (r#""\z""#, "z"),
            (r#""\0""#, "\0"),
            (r#""\12""#, "\n"),
            (r#""\101""#, "A"),
            (r#""\1011""#, "A1"),
            (r#""\377""#, "\u{ff}"),
            (r#""\78""#, "\u{07}8"),
            (r#""\x41""#, "A"),
            (r#""\x4a\x4A""#, "JJ"),
            (r#""\x{41}""#, "A"),
            (r#""\x{1F600}""#, "😀"),
            (r#""\x{0000041}""#, "A"),
            (r#""\^a""#, "\u{01}"),
            (r#""\^Z""#, "\u{1a}"),
            (r#""\^[""#, "\u{1b}"),
            ("\"\\\nx\"", "\nx"),
            (r#""a\x{42}c\x43""#, "aBcC"),
        ];
        for (source, expected) in cases {
            assert_eq!(one(&format!("{source}.")), string(expected), "for {source}");
        }
    }

    #[test]
    fn invalid_escapes() {
        for (source, line) in [
            ("\"\\x{110000}\".", 1),
            ("\"\\x{D800}\".", 1),
            ("\n\"\\xG1\".", 2),
            ("\"\\x4\".", 1),
            ("\"\\x{}\".", 1),
            ("\"\\x{12g}\".", 1),
            ("\"\\x{FFFFFFFFF}\".", 1),
        ] {
            match parse_terms(source) {
                Err(MetadataError::InvalidEscape { line: l, .. }) => {
                    assert_eq!(l, line, "for {source:?}")
                }
                other => panic!("expected InvalidEscape for {source:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn unterminated_strings_and_atoms() {
        assert_eq!(
            parse_terms("{a,\n \"abc\n\ndef}."),
            Err(MetadataError::UnterminatedString { line: 2 })
        );
        assert_eq!(
            parse_terms("\"abc\\"),
            Err(MetadataError::UnterminatedString { line: 1 })
        );
        assert_eq!(
            parse_terms("\"\\x{41"),
            Err(MetadataError::UnterminatedString { line: 1 })
        );
        assert_eq!(
            parse_terms("\n\n'abc}."),
            Err(MetadataError::UnterminatedAtom { line: 3 })
        );
    }

    #[test]
    fn atoms() {
        assert_eq!(one("true."), atom("true"));
        assert_eq!(one("nil."), atom("nil"));
        assert_eq!(one("a_B@9."), atom("a_B@9"));
        assert_eq!(one("'Foo bar'."), atom("Foo bar"));
        assert_eq!(one("''."), atom(""));
        assert_eq!(one(r"'it\'s\n'."), atom("it's\n"));
        assert_eq!(one("'fun'."), atom("fun"));
        assert_eq!(one("ärger."), atom("ärger"));
        let long = "a".repeat(255);
        assert_eq!(one(&format!("{long}.")), atom(&long));
        assert_eq!(syntax_line(parse_terms(&format!("{long}a."))), 1);
        assert_eq!(syntax_line(parse_terms(&format!("'{long}b'."))), 1);
        assert_eq!(syntax_line(parse_terms("fun.")), 1);
    }

    #[test]
    fn variables_rejected() {
        for source in ["Foo.", "{a, _}.", "[_Bar].", "Été."] {
            match parse_terms(source) {
                Err(MetadataError::Syntax { message, .. }) => {
                    assert!(message.contains("variable"), "{source}: {message}")
                }
                other => panic!("expected variable error for {source}, got {other:?}"),
            }
        }
    }

    #[test]
    fn integers() {
        assert_eq!(one("0."), Term::Integer(0));
        assert_eq!(one("42."), Term::Integer(42));
        assert_eq!(one("-5."), Term::Integer(-5));
        assert_eq!(one("- 3."), Term::Integer(-3));
        assert_eq!(one("+7."), Term::Integer(7));
        assert_eq!(one("1_000_000."), Term::Integer(1_000_000));
        assert_eq!(one("16#fF."), Term::Integer(255));
        assert_eq!(one("2#1010."), Term::Integer(10));
        assert_eq!(one("36#Z."), Term::Integer(35));
        assert_eq!(one("-16#10."), Term::Integer(-16));
        assert_eq!(one("$a."), Term::Integer(97));
        assert_eq!(one("$\\n."), Term::Integer(10));
        assert_eq!(one("$\\s."), Term::Integer(32));
        assert_eq!(one("$ ."), Term::Integer(32));
        assert_eq!(one("$✓."), Term::Integer(0x2713));
        assert_eq!(one("9223372036854775807."), Term::Integer(i64::MAX));
        assert_eq!(one("-9223372036854775808."), Term::Integer(i64::MIN));
    }

    #[test]
    fn integer_errors() {
        for source in [
            "9223372036854775808.",
            "-9223372036854775809.",
            "123456789012345678901234567890.",
            "16#FFFFFFFFFFFFFFFFF.",
        ] {
            assert!(
                matches!(
                    parse_terms(source),
                    Err(MetadataError::NumberOutOfRange { line: 1, .. })
                ),
                "{source}"
            );
        }
        assert_eq!(syntax_line(parse_terms("2#102.")), 1);
        assert_eq!(syntax_line(parse_terms("1#0.")), 1);
        assert_eq!(syntax_line(parse_terms("37#0.")), 1);
        assert_eq!(syntax_line(parse_terms("16#.")), 1);
        assert_eq!(syntax_line(parse_terms("- a.")), 1);
        assert_eq!(syntax_line(parse_terms("-")), 1);
        // A `_` not between digits starts a variable.
        assert_eq!(syntax_line(parse_terms("1_.")), 1);
    }

    #[test]
    fn floats() {
        assert_eq!(one("1.5."), Term::Float(1.5));
        assert_eq!(one("-0.25."), Term::Float(-0.25));
        assert_eq!(one("1.0e3."), Term::Float(1000.0));
        assert_eq!(one("2.5E-2."), Term::Float(0.025));
        assert_eq!(one("1.0e+2."), Term::Float(100.0));
        assert_eq!(one("1_0.5."), Term::Float(10.5));
        assert_eq!(one("1.0e300."), Term::Float(1.0e300));
        assert!(matches!(
            parse_terms("1.0e999."),
            Err(MetadataError::NumberOutOfRange { line: 1, .. })
        ));
        // `1.e5` is not a float: with a lenient `.` it reads as `1.` `e5.`.
        assert_eq!(parse_terms("1.e5."), Ok(vec![Term::Integer(1), atom("e5")]));
        assert_eq!(syntax_line(parse_terms("{1.e5}.")), 1);
    }

    #[test]
    fn containers() {
        assert_eq!(one("[]."), Term::List(vec![]));
        assert_eq!(one("{}."), Term::Tuple(vec![]));
        assert_eq!(one("#{}."), Term::Map(vec![]));
        assert_eq!(one("# { }."), Term::Map(vec![]));
        assert_eq!(
            one("{a, [1, \"s\"], #{<<\"k\">> => {}, x => [[]]}}."),
            Term::Tuple(vec![
                atom("a"),
                Term::List(vec![Term::Integer(1), string("s")]),
                Term::Map(vec![
                    (bin("k"), Term::Tuple(vec![])),
                    (atom("x"), Term::List(vec![Term::List(vec![])])),
                ]),
            ])
        );
        // `>>=>` is a binary end followed by an arrow.
        assert_eq!(
            one("#{<<\"a\">>=><<\"b\">>}."),
            Term::Map(vec![(bin("a"), bin("b"))])
        );
    }

    #[test]
    fn container_errors() {
        assert_eq!(syntax_line(parse_terms("[a,].")), 1);
        assert_eq!(syntax_line(parse_terms("{a,,b}.")), 1);
        assert_eq!(syntax_line(parse_terms("\n[a b].")), 2);
        assert_eq!(syntax_line(parse_terms("#{a}.")), 1);
        assert_eq!(syntax_line(parse_terms("#{a => }.")), 1);
        assert_eq!(syntax_line(parse_terms("#{a := b}.")), 1);
        assert_eq!(syntax_line(parse_terms("#rec{a = 1}.")), 1);
        assert_eq!(syntax_line(parse_terms("[a => b].")), 1);
        assert_eq!(syntax_line(parse_terms("[a | b].")), 1);
        assert_eq!(syntax_line(parse_terms("[a}.")), 1);
        assert_eq!(syntax_line(parse_terms("}.")), 1);
        assert_eq!(syntax_line(parse_terms("f(x).")), 1);
        assert_eq!(
            parse_terms("1 + 2."),
            Err(MetadataError::MissingTerminator { line: 1 })
        );
        assert_eq!(syntax_line(parse_terms("a < b.")), 1);
        assert_eq!(syntax_line(parse_terms("a = b.")), 1);
        assert_eq!(syntax_line(parse_terms("\n\n..")), 3);
    }

    #[test]
    fn unclosed_containers() {
        for (source, line, opener) in [
            ("\n[a, b", 2, "["),
            ("[a,", 1, "["),
            ("{a,\n b", 1, "{"),
            ("{", 1, "{"),
            ("x.\n#{a => 1", 2, "#{"),
            ("#{a =>", 1, "#{"),
            ("#{a", 1, "#{"),
            ("<<\"abc\"", 1, "<<"),
            ("\n<<", 2, "<<"),
            ("<<\"a\"/", 1, "<<"),
            ("{[<<1,", 1, "<<"),
        ] {
            assert_eq!(
                parse_terms(source),
                Err(MetadataError::Unclosed { line, opener }),
                "for {source:?}"
            );
        }
    }

    #[test]
    fn comments_and_whitespace() {
        let text = "% leading comment\r\n{<<\"a\">>, % after a key\n\t[1, % inside\n 2]}. % trailing\n%last without newline";
        assert_eq!(
            parse_terms(text).expect("parses"),
            vec![Term::Tuple(vec![
                bin("a"),
                Term::List(vec![Term::Integer(1), Term::Integer(2)]),
            ])]
        );
        // `%` inside strings, atoms and binaries is text.
        assert_eq!(
            one("{\"50%\", '%', <<\"%\">>}."),
            Term::Tuple(vec![string("50%"), atom("%"), bin("%")])
        );
        // No-break space and other Latin-1 controls count as whitespace.
        assert_eq!(one("\u{a0}[\u{85}]\u{a0}."), Term::List(vec![]));
    }

    #[test]
    fn adjacent_strings_join_across_lines() {
        assert_eq!(
            parse_terms("\"line one\\n\"\n  % comment\n  \"line two\".\n{x}.").expect("parses"),
            vec![string("line one\nline two"), Term::Tuple(vec![atom("x")])]
        );
        // Lines keep counting through the joined literals.
        assert_eq!(
            parse_terms("\"a\"\n\"b\"\n\"c\" ]"),
            Err(MetadataError::MissingTerminator { line: 3 })
        );
    }

    #[test]
    fn empty_inputs() {
        assert_eq!(parse_terms(""), Ok(vec![]));
        assert_eq!(parse_terms("  \n\t% only a comment\n"), Ok(vec![]));
    }

    #[test]
    fn dot_needs_no_following_whitespace() {
        assert_eq!(
            parse_terms("{a}.{b}.1.5.").expect("parses"),
            vec![
                Term::Tuple(vec![atom("a")]),
                Term::Tuple(vec![atom("b")]),
                Term::Float(1.5),
            ]
        );
    }

    #[test]
    fn missing_terminators() {
        assert_eq!(
            parse_terms("{a}.\n{b}\n"),
            Err(MetadataError::MissingTerminator { line: 2 })
        );
        assert_eq!(
            parse_terms("{a}\n{b}."),
            Err(MetadataError::MissingTerminator { line: 2 })
        );
        // Trailing garbage after the last term.
        assert_eq!(
            parse_terms("{a}.\n\ngarbage"),
            Err(MetadataError::MissingTerminator { line: 3 })
        );
        assert_eq!(
            parse_terms("{a}.\n\"multi\nline\""),
            Err(MetadataError::MissingTerminator { line: 2 })
        );
        assert_eq!(syntax_line(parse_terms("{a}.\n}")), 2);
        assert_eq!(syntax_line(parse_terms("{a}. ;")), 1);
        assert_eq!(syntax_line(parse_terms("{a}.\n@")), 2);
    }

    #[test]
    fn depth_limit_boundary() {
        let ok = format!("{}{}.", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse_terms(&ok).is_ok());
        let deep = format!(
            "{}{}.",
            "[".repeat(MAX_DEPTH + 1),
            "]".repeat(MAX_DEPTH + 1)
        );
        assert_eq!(parse_terms(&deep), Err(MetadataError::TooDeep { line: 1 }));
    }

    #[test]
    fn depth_limit_stops_hostile_nesting() {
        let lists = "[".repeat(10_000);
        assert_eq!(parse_terms(&lists), Err(MetadataError::TooDeep { line: 1 }));
        let tuples = "{".repeat(10_000);
        assert_eq!(
            parse_terms(&tuples),
            Err(MetadataError::TooDeep { line: 1 })
        );
        let maps = "#{a => ".repeat(10_000);
        assert_eq!(parse_terms(&maps), Err(MetadataError::TooDeep { line: 1 }));
        let mixed = "\n[{#{k => ".repeat(5_000);
        assert_eq!(
            parse_terms(&mixed),
            // Three containers a line from line 2: the 65th opens on line 23.
            Err(MetadataError::TooDeep { line: 23 })
        );
        assert_eq!(
            parse_metadata(&format!("{{<<\"requirements\">>,{}", "[".repeat(10_000))),
            Err(MetadataError::TooDeep { line: 1 })
        );
    }

    #[test]
    fn errors_display_their_line() {
        let err = parse_terms("\n\n\"open").expect_err("unterminated");
        assert_eq!(err.to_string(), "line 3: string is never closed");
        let err = parse_terms(&"[".repeat(100)).expect_err("too deep");
        assert_eq!(
            err.to_string(),
            "line 1: terms nested deeper than 64 levels"
        );
        assert_eq!(
            MetadataError::MissingField("version").to_string(),
            "required field `version` is missing"
        );
    }

    #[test]
    fn unexpected_characters() {
        for (source, line) in [("\n\n`", 3), ("{a, ;}.", 1), ("<a>.", 1), ("a > b.", 1)] {
            assert_eq!(syntax_line(parse_terms(source)), line, "for {source:?}");
        }
    }
}

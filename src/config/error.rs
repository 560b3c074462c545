//! Config errors with their place in the file: the line and column of the
//! offending value, rendered with the line itself as serde-saphyr renders its
//! own parse errors (annotate-snippets), so every config error looks alike.

use std::fmt;

use annotate_snippets::renderer::DecorStyle;
use annotate_snippets::{AnnotationKind, Level, Renderer, Snippet};
use serde_saphyr::Spanned;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: u64,
    pub column: u64,
}

impl Pos {
    /// Where a value was in the file; `None` for a default.
    pub(super) fn of<T>(s: &Spanned<T>) -> Option<Pos> {
        let (line, column) = (s.referenced.line(), s.referenced.column());
        (line > 0).then_some(Pos { line, column })
    }
}

/// A config error with its place in the file.
#[derive(Debug, Clone)]
pub struct ConfigError {
    pub source_name: String,
    pub pos: Option<Pos>,
    /// What is wrong, naming the key.
    pub message: String,
    /// The message with the file's line under it, when the place is known.
    rendered: Option<String>,
}

impl ConfigError {
    /// An error without a place (an unreadable or empty file).
    pub(crate) fn plain(source_name: &str, message: String) -> ConfigError {
        ConfigError { source_name: source_name.to_owned(), pos: None, message, rendered: None }
    }

    /// An error serde-saphyr found and rendered itself.
    pub(super) fn parse(source_name: &str, e: &serde_saphyr::Error) -> ConfigError {
        let pos = e.location().map(|l| Pos { line: l.line(), column: l.column() }).filter(|p| p.line > 0);
        let rendered = e.render_with_options(serde_saphyr::render_options! { source_name: Some(source_name) });
        ConfigError { source_name: source_name.to_owned(), pos, message: e.to_string(), rendered: Some(rendered) }
    }

    /// An error about the value at `pos` in `text`.
    pub(crate) fn at(source_name: &str, text: &str, pos: Option<Pos>, message: String) -> ConfigError {
        let rendered = pos.and_then(|pos| render(source_name, text, pos, &message));
        ConfigError { source_name: source_name.to_owned(), pos, message, rendered }
    }
}

/// The message over the offending line, the value underlined.
fn render(source_name: &str, text: &str, pos: Pos, message: &str) -> Option<String> {
    let line = text.lines().nth(usize::try_from(pos.line).ok()?.checked_sub(1)?)?;
    // Columns count characters from 1; the span is the value's first token.
    let start =
        line.char_indices().nth(usize::try_from(pos.column).ok()?.saturating_sub(1)).map_or(line.len(), |(i, _)| i);
    let len = line[start..].find([' ', ',', ']', '}', '#']).unwrap_or(line.len() - start).max(1);
    let end = (start + len).min(line.len());
    let snippet = Snippet::source(line)
        .line_start(usize::try_from(pos.line).ok()?)
        .path(source_name)
        .annotation(AnnotationKind::Primary.span(start..end.max(start)));
    let report = &[Level::ERROR.primary_title(message).element(snippet)];
    Some(Renderer::plain().decor_style(DecorStyle::Ascii).render(report).to_string())
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.rendered {
            Some(rendered) => f.write_str(rendered),
            None if self.message.contains(&self.source_name) => f.write_str(&self.message),
            None => write!(f, "{}: {}", self.source_name, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

//! Config errors with their place in the file: the line and column of the
//! offending value, rendered with the line itself as serde-saphyr renders its
//! own parse errors (annotate-snippets), so every config error looks alike.
//!
//! Whatever the file holds, an error stays readable and small: every line of
//! it is cut at [`MAX_LINE`] characters (a 3 MB pattern is shown by its
//! first 200 characters and its length), and the source line is shown as a
//! window around the offending column.

use std::fmt;

use annotate_snippets::renderer::DecorStyle;
use annotate_snippets::{AnnotationKind, Level, Renderer, Snippet};
use serde_saphyr::Spanned;

/// Longest line of an error message, in characters; longer lines (a huge
/// value echoed back, a huge source line) are cut, saying by how much.
pub const MAX_LINE: usize = 200;

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
        ConfigError { source_name: source_name.to_owned(), pos: None, message: clip_lines(&message), rendered: None }
    }

    /// An error serde-saphyr found and rendered itself. A breach of its
    /// budget (nodes, depth, aliases...) is said in words a user can act on.
    pub(super) fn parse(source_name: &str, e: &serde_saphyr::Error) -> ConfigError {
        let pos = e.location().map(|l| Pos { line: l.line(), column: l.column() }).filter(|p| p.line > 0);
        if let serde_saphyr::Error::Budget { breach, .. } = e.without_snippet() {
            let message = format!(
                "the config is too large or too deeply nested for the YAML reader ({breach:?}): a config is a few \
                 hundred lines; split very long pattern lists across rules, and do not use YAML anchors to build it"
            );
            return ConfigError {
                source_name: source_name.to_owned(),
                pos,
                message: clip_lines(&message),
                rendered: None,
            };
        }
        let rendered = e.render_with_options(serde_saphyr::render_options! { source_name: Some(source_name) });
        ConfigError {
            source_name: source_name.to_owned(),
            pos,
            message: clip_lines(&e.to_string()),
            rendered: Some(clip_lines(&rendered)),
        }
    }

    /// An error about the value at `pos` in `text`.
    pub(crate) fn at(source_name: &str, text: &str, pos: Option<Pos>, message: String) -> ConfigError {
        let message = clip_lines(&message);
        let rendered = pos.and_then(|pos| render(source_name, text, pos, &message));
        ConfigError { source_name: source_name.to_owned(), pos, message, rendered }
    }
}

/// `text` with every line longer than [`MAX_LINE`] characters cut there.
pub(crate) fn clip_lines(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(16 * 1024));
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        match line.char_indices().nth(MAX_LINE) {
            None => out.push_str(line),
            Some((cut, _)) => {
                out.push_str(&line[..cut]);
                out.push_str(&format!("... ({} more bytes)", line.len() - cut));
            }
        }
    }
    out
}

/// The message over the offending line, the value underlined. A line
/// longer than [`MAX_LINE`] is shown as a window from a little before the
/// value, and the title then says where the value is.
fn render(source_name: &str, text: &str, pos: Pos, message: &str) -> Option<String> {
    let line = text.lines().nth(usize::try_from(pos.line).ok()?.checked_sub(1)?)?;
    // Columns count characters from 1.
    let column = usize::try_from(pos.column).ok()?.saturating_sub(1);
    let long = line.chars().nth(MAX_LINE).is_some();
    let skip = if long { column.saturating_sub(MAX_LINE / 4) } else { 0 };
    let from = line.char_indices().nth(skip).map_or(line.len(), |(i, _)| i);
    let window = &line[from..];
    let window = window.char_indices().nth(MAX_LINE).map_or(window, |(i, _)| &window[..i]);
    // The span is the value's first token, within the window.
    let start = window.char_indices().nth(column - skip).map_or(window.len(), |(i, _)| i);
    let len = window[start..].find([' ', ',', ']', '}', '#']).unwrap_or(window.len() - start).max(1);
    let end = (start + len).min(window.len());
    let title = if long { format!("{message} (line {}, column {})", pos.line, pos.column) } else { message.to_owned() };
    let snippet = Snippet::source(window)
        .line_start(usize::try_from(pos.line).ok()?)
        .path(source_name)
        .annotation(AnnotationKind::Primary.span(start..end.max(start)));
    let report = &[Level::ERROR.primary_title(&title).element(snippet)];
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

//! A small RFC 4180 CSV reader: quoted fields may hold commas, doubled quotes and line breaks.

use crate::error::{PlanError, Result};

/// Parses `text` into rows of fields. The header is the first row; every row must have as many
/// fields as the header. Blank lines are skipped.
pub fn parse(source: &str, text: &str) -> Result<Vec<Vec<String>>> {
    let mut rows = Vec::new();
    let mut row: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    let mut field_was_quoted = false;
    let mut chars = text.chars().peekable();
    let mut line = 1usize;
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() && !field_was_quoted => {
                in_quotes = true;
                field_was_quoted = true;
            }
            '"' => {
                return Err(PlanError::Parse {
                    source: source.into(),
                    why: format!("line {line}: quote inside an unquoted field"),
                })
            }
            ',' => {
                row.push(std::mem::take(&mut field));
                field_was_quoted = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                row.push(std::mem::take(&mut field));
                field_was_quoted = false;
                if !(row.len() == 1 && row[0].is_empty()) {
                    rows.push(std::mem::take(&mut row));
                } else {
                    row.clear();
                }
                line += 1;
            }
            _ if field_was_quoted => {
                return Err(PlanError::Parse {
                    source: source.into(),
                    why: format!("line {line}: text after a closing quote"),
                })
            }
            _ => field.push(c),
        }
    }
    if in_quotes {
        return Err(PlanError::Parse { source: source.into(), why: "unterminated quoted field".into() });
    }
    if !field.is_empty() || field_was_quoted || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    if let Some(header) = rows.first() {
        let n = header.len();
        for (i, r) in rows.iter().enumerate() {
            if r.len() != n {
                return Err(PlanError::Parse {
                    source: source.into(),
                    why: format!("record {} has {} fields, the header has {n}", i + 1, r.len()),
                });
            }
        }
    }
    Ok(rows)
}

/// Rows as (header name → value) lookups.
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn parse(source: &str, text: &str) -> Result<Table> {
        let mut rows = parse(source, text)?;
        if rows.is_empty() {
            return Err(PlanError::Parse { source: source.into(), why: "empty file".into() });
        }
        let header = rows.remove(0).into_iter().map(|h| h.trim().to_string()).collect();
        Ok(Table { header, rows })
    }

    pub fn col(&self, name: &str) -> Option<usize> {
        self.header.iter().position(|h| h == name)
    }

    pub fn get<'a>(&self, row: &'a [String], name: &str) -> &'a str {
        self.col(name).map_or("", |i| row[i].trim())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_fields_hold_commas_quotes_and_newlines() {
        let rows = parse("t", "a,b,c\n\"x, y\",\"he said \"\"hi\"\"\",\"two\nlines\"\r\n1,,3").unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1], vec!["x, y", "he said \"hi\"", "two\nlines"]);
        assert_eq!(rows[2], vec!["1", "", "3"]);
    }

    #[test]
    fn ragged_rows_and_stray_quotes_are_errors() {
        assert!(parse("t", "a,b\n1\n").unwrap_err().to_string().contains("record 2 has 1 fields"));
        assert!(parse("t", "a,b\n1\"x,2\n").is_err());
        assert!(parse("t", "a\n\"open").is_err());
    }
}

//! Per-channel JSON Schemas (`[[schemas]]`): which channels are validated, against what, and
//! the check itself.
//!
//! Every schema is read and compiled once, when the gateway starts ([`Schemas::compile`]); a
//! file that is missing, not JSON or not a valid draft 2020-12 schema stops the start naming
//! the file. Channels are matched with the glob syntax of `channels.public`; the first table
//! with a matching pattern applies and a channel no table matches is not validated.
//!
//! This module decides nothing about what happens to a payload that fails: the hub drops it
//! (`schema_invalid`) and `POST /publish` answers `422`. Schemas never fetch anything: the
//! crate's remote `$ref` resolution is compiled out, so a `$ref` outside the file fails at
//! start-up instead of reaching the network at run time.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::channels::Pattern;
use crate::config::{ConfigError, SchemaSettings};

/// Most validation errors reported for one payload (`POST /publish`'s `422` body).
pub const MAX_VIOLATIONS: usize = 10;
/// Longest error message kept, in characters: a message can quote the payload (an enum of a
/// hundred values, a long string), and it ends up in a log line or a response.
const MAX_MESSAGE_CHARS: usize = 256;

/// The compiled `[[schemas]]` tables, in configuration order.
#[derive(Debug, Default)]
pub struct Schemas {
    tables: Vec<Table>,
}

/// One `[[schemas]]` table.
#[derive(Debug)]
struct Table {
    patterns: Vec<Pattern>,
    schema: Arc<Schema>,
}

/// One compiled schema, shared by every channel it applies to.
pub struct Schema {
    /// The file it was read from (after resolving a relative path), for messages.
    file: PathBuf,
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schema").field("file", &self.file).finish()
    }
}

/// Why a payload does not satisfy its schema: where (a JSON Pointer into the payload, `""` for
/// the whole of it) and what.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Violation {
    /// JSON Pointer to the failing value, e.g. `/items/0/qty`.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl Schemas {
    /// Reads and compiles every table's schema. The error names the table's `file` key, the
    /// file and what is wrong with it.
    pub fn compile(settings: &[SchemaSettings]) -> Result<Schemas, ConfigError> {
        let tables = settings
            .iter()
            .enumerate()
            .map(|(index, table)| {
                let invalid = |key: &str, message: String| ConfigError::InvalidEntry {
                    key: format!("schemas[{index}].{key}"),
                    message,
                };
                let patterns = table
                    .channels
                    .iter()
                    .map(|pattern| Pattern::parse(pattern))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|message| invalid("channels", message))?;
                let schema = Schema::load(&table.file).map_err(|message| {
                    invalid("file", format!("{}: {message}", table.file.display()))
                })?;
                Ok(Table {
                    patterns,
                    schema: Arc::new(schema),
                })
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(Schemas { tables })
    }

    /// Whether any schema is configured.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// The schema payloads on channel `name` must satisfy: the first table with a pattern that
    /// matches, or `None` when no table does (the channel is not validated).
    pub fn for_channel(&self, name: &str) -> Option<Arc<Schema>> {
        self.tables
            .iter()
            .find(|table| table.patterns.iter().any(|p| p.matches(name)))
            .map(|table| table.schema.clone())
    }
}

#[cfg(test)]
impl Schemas {
    /// Compiled from documents rather than files, for unit tests elsewhere in the crate.
    pub(crate) fn from_documents(tables: &[(&[&str], Value)]) -> Schemas {
        let tables = tables
            .iter()
            .map(|(channels, document)| Table {
                patterns: channels
                    .iter()
                    .map(|c| Pattern::parse(c).expect("valid pattern"))
                    .collect(),
                schema: Arc::new(Schema {
                    file: PathBuf::from("test.json"),
                    validator: jsonschema::draft202012::new(document).expect("valid schema"),
                }),
            })
            .collect();
        Schemas { tables }
    }
}

impl Schema {
    /// Reads and compiles the schema in `file`; the error says what is wrong, without the path.
    fn load(file: &Path) -> Result<Schema, String> {
        let text = std::fs::read(file).map_err(|e| format!("cannot read the file: {e}"))?;
        let document: Value =
            serde_json::from_slice(&text).map_err(|e| format!("not JSON: {e}"))?;
        let validator = jsonschema::draft202012::new(&document)
            .map_err(|e| format!("not a valid JSON Schema (draft 2020-12): {e}"))?;
        Ok(Schema {
            file: file.to_path_buf(),
            validator,
        })
    }

    /// The file the schema was read from.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Checks `payload`: `Ok`, or up to [`MAX_VIOLATIONS`] violations (one when it is not
    /// JSON). Messages may quote the payload: meant for whoever sent it.
    pub fn check(&self, payload: &str) -> Result<(), Vec<Violation>> {
        let instance = parse(payload).map_err(|violation| vec![violation])?;
        let violations: Vec<Violation> = self
            .validator
            .iter_errors(&instance)
            .take(MAX_VIOLATIONS)
            .map(|error| Violation::new(error.instance_path().as_str(), error.to_string()))
            .collect();
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations)
        }
    }

    /// Checks `payload` and returns its first violation, if any, with the payload's values
    /// masked in the message: meant for logs, which must not copy what payloads carry.
    pub fn first_violation(&self, payload: &str) -> Option<Violation> {
        let instance = match parse(payload) {
            Ok(instance) => instance,
            Err(violation) => return Some(violation),
        };
        let error = self.validator.validate(&instance).err()?;
        Some(Violation::new(
            error.instance_path().as_str(),
            error.masked().to_string(),
        ))
    }
}

/// The payload as JSON, or the violation of not being JSON at all.
fn parse(payload: &str) -> Result<Value, Violation> {
    serde_json::from_str(payload).map_err(|e| Violation::new("", format!("not JSON: {e}")))
}

impl Violation {
    fn new(path: &str, message: String) -> Violation {
        let message = match message.char_indices().nth(MAX_MESSAGE_CHARS) {
            Some((end, _)) => format!("{}...", &message[..end]),
            None => message,
        };
        Violation {
            path: path.to_string(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A schema file with `document` in a scratch folder, removed on drop.
    struct SchemaFile {
        path: PathBuf,
    }

    impl SchemaFile {
        fn write(name: &str, document: &str) -> SchemaFile {
            let path =
                std::env::temp_dir().join(format!("ssehub-schema-{}-{name}", std::process::id()));
            std::fs::write(&path, document).expect("temp dir is writable");
            SchemaFile { path }
        }

        fn table(&self, channels: &[&str]) -> SchemaSettings {
            SchemaSettings {
                channels: channels.iter().map(|c| c.to_string()).collect(),
                file: self.path.clone(),
            }
        }
    }

    impl Drop for SchemaFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    const ORDER: &str = r#"{
        "type": "object",
        "required": ["id", "items"],
        "properties": {
            "id": {"type": "string"},
            "items": {"type": "array", "items": {
                "type": "object",
                "properties": {"qty": {"type": "integer", "minimum": 1}}
            }}
        }
    }"#;

    fn compile(tables: &[SchemaSettings]) -> Result<Schemas, String> {
        Schemas::compile(tables).map_err(|e| e.to_string())
    }

    #[test]
    fn the_first_matching_table_applies_and_unmatched_channels_are_not_validated() {
        let order = SchemaFile::write("first-order.json", ORDER);
        let anything = SchemaFile::write("first-any.json", "true");
        let schemas = compile(&[
            anything.table(&["orders:free"]),
            order.table(&["orders:*"]),
            anything.table(&["orders:*", "audit"]),
        ])
        .expect("valid schemas");
        let file_for = |name| schemas.for_channel(name).map(|s| s.file().to_path_buf());
        assert_eq!(file_for("orders:free"), Some(anything.path.clone()));
        assert_eq!(file_for("orders:7"), Some(order.path.clone()));
        assert_eq!(file_for("audit"), Some(anything.path.clone()));
        assert_eq!(file_for("news"), None);
        assert!(!schemas.is_empty());
        assert!(Schemas::default().for_channel("orders:7").is_none());
    }

    #[test]
    fn violations_carry_the_json_pointer_and_are_capped() {
        let order = SchemaFile::write("violations.json", ORDER);
        let schemas = compile(&[order.table(&["orders:*"])]).expect("valid schema");
        let schema = schemas.for_channel("orders:1").expect("matched");
        assert_eq!(schema.check(r#"{"id":"a","items":[{"qty":2}]}"#), Ok(()));
        let violations = schema
            .check(r#"{"id":"a","items":[{"qty":2},{"qty":0}]}"#)
            .expect_err("qty 0 is below the minimum");
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].path, "/items/1/qty");
        let many: Vec<String> = (0..25).map(|_| r#"{"qty":"x"}"#.to_string()).collect();
        let payload = format!(r#"{{"id":"a","items":[{}]}}"#, many.join(","));
        let violations = schema.check(&payload).expect_err("every qty is a string");
        assert_eq!(violations.len(), MAX_VIOLATIONS);
        assert_eq!(
            schema.first_violation(&payload).map(|v| v.path),
            Some("/items/0/qty".to_string())
        );
    }

    #[test]
    fn non_json_is_a_violation_of_the_whole_payload() {
        let order = SchemaFile::write("non-json.json", ORDER);
        let schemas = compile(&[order.table(&["orders:*"])]).expect("valid schema");
        let schema = schemas.for_channel("orders:1").expect("matched");
        let violation = schema.first_violation("not json").expect("not JSON");
        assert_eq!(violation.path, "");
        assert!(violation.message.starts_with("not JSON"), "{violation:?}");
        assert_eq!(schema.check("{").map_err(|v| v.len()), Err(1));
    }

    #[test]
    fn log_messages_mask_the_payload_values() {
        let order = SchemaFile::write("masked.json", ORDER);
        let schemas = compile(&[order.table(&["orders:*"])]).expect("valid schema");
        let schema = schemas.for_channel("orders:1").expect("matched");
        let payload = r#"{"id":"secret-card-number","items":[]}"#
            .replace(r#""secret-card-number""#, r#"{"card":"4111-1111"}"#);
        let violation = schema
            .first_violation(&payload)
            .expect("id is not a string");
        assert_eq!(violation.path, "/id");
        assert!(!violation.message.contains("4111"), "{violation:?}");
        let for_the_sender = schema.check(&payload).expect_err("id is not a string");
        assert!(
            for_the_sender[0].message.contains("4111"),
            "{for_the_sender:?}"
        );
    }

    #[test]
    fn long_messages_are_cut() {
        let long = "é".repeat(MAX_MESSAGE_CHARS * 2);
        let violation = Violation::new("/a", long);
        assert_eq!(violation.message.chars().count(), MAX_MESSAGE_CHARS + 3);
    }

    #[test]
    fn bad_schema_files_are_refused_naming_the_key_and_the_file() {
        let not_json = SchemaFile::write("bad-not-json.json", "{");
        let not_schema = SchemaFile::write("bad-not-schema.json", r#"{"type": 12}"#);
        let remote = SchemaFile::write(
            "bad-remote.json",
            r#"{"$ref": "https://example.com/order.json"}"#,
        );
        let missing = SchemaSettings {
            channels: vec!["a".to_string()],
            file: std::env::temp_dir().join("ssehub-no-such-schema.json"),
        };
        let fine = SchemaFile::write("bad-fine.json", "true");
        let cases = [
            (not_json.table(&["a"]), "not JSON"),
            (not_schema.table(&["a"]), "not a valid JSON Schema"),
            (remote.table(&["a"]), "not a valid JSON Schema"),
            (missing, "cannot read the file"),
        ];
        for (table, problem) in cases {
            let file = table.file.display().to_string();
            let error = compile(&[fine.table(&["b"]), table]).expect_err(problem);
            assert!(error.contains("`schemas[1].file`"), "{error}");
            assert!(error.contains(&file), "{error}");
            assert!(error.contains(problem), "{error}");
        }
    }
}

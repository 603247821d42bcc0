//! HCM `access_log[]`: `envoy.access_loggers.file`, `.stdout` and `.stderr`, with
//! `log_format` (`text_format_source`, `text_format` or `json_format`).

use super::{check_name, type_error, Ctx, Slot, P};
use crate::any::{FILE_ACCESS_LOG, STDERR_ACCESS_LOG, STDOUT_ACCESS_LOG};
use crate::datasource::decode_base64;
use crate::format::{self, Template};
use crate::model;
use crate::raw::{self, AccessLoggerConfig};

const FILE_NAME: &str = "envoy.access_loggers.file";
const STDOUT_NAME: &str = "envoy.access_loggers.stdout";
const STDERR_NAME: &str = "envoy.access_loggers.stderr";

const ACCESS_LOG_SLOT: Slot = Slot {
    what: "access logger",
    category: "envoy.access_loggers.",
    names: &[FILE_NAME, STDOUT_NAME, STDERR_NAME],
    expected: &[FILE_ACCESS_LOG, STDOUT_ACCESS_LOG, STDERR_ACCESS_LOG],
};

pub(super) fn build_access_logs(
    ctx: &mut Ctx,
    p: &P,
    logs: &[raw::AccessLog],
) -> Vec<model::AccessLog> {
    let mut out = Vec::with_capacity(logs.len());
    for (i, l) in logs.iter().enumerate() {
        let lp = p.i(i);
        ctx.unsupported(&lp, l.unsupported_fields());
        let name = l.name.as_deref().unwrap_or("");
        let tp = lp.f("typed_config");
        let built = match &l.typed_config {
            Some(AccessLoggerConfig::File(f)) => {
                check_name(ctx, &lp.f("name"), name, FILE_NAME);
                ctx.unsupported(&tp, f.unsupported_fields());
                let path = ctx.required(&tp.f("path"), f.path.as_ref()).to_owned();
                let format = build_format(ctx, &tp.f("log_format"), f.log_format.as_ref());
                Some(model::AccessLog {
                    sink: model::AccessLogSink::File(path),
                    format,
                })
            }
            Some(AccessLoggerConfig::Stdout(s)) | Some(AccessLoggerConfig::Stderr(s)) => {
                let (sink, expected) = match &l.typed_config {
                    Some(AccessLoggerConfig::Stdout(_)) => {
                        (model::AccessLogSink::Stdout, STDOUT_NAME)
                    }
                    _ => (model::AccessLogSink::Stderr, STDERR_NAME),
                };
                check_name(ctx, &lp.f("name"), name, expected);
                ctx.unsupported(&tp, s.unsupported_fields());
                let format = build_format(ctx, &tp.f("log_format"), s.log_format.as_ref());
                Some(model::AccessLog { sink, format })
            }
            Some(AccessLoggerConfig::Other(url)) => {
                type_error(ctx, &tp.f("@type"), url, &ACCESS_LOG_SLOT);
                None
            }
            None => {
                ctx.err(
                    &tp,
                    "is required: an access logger (`envoy.access_loggers.file`, `.stdout` or `.stderr`)",
                );
                None
            }
        };
        out.extend(built);
    }
    out
}

fn template(ctx: &mut Ctx, p: &P, text: &str) -> Template {
    format::parse(text).unwrap_or_else(|e| {
        ctx.err(p, e.0);
        Template::default()
    })
}

fn build_format(
    ctx: &mut Ctx,
    p: &P,
    f: Option<&raw::SubstitutionFormatString>,
) -> model::LogFormat {
    let Some(f) = f else {
        return model::LogFormat::Text {
            template: template(ctx, p, format::ENVOY_DEFAULT_FORMAT),
            omit_empty_values: false,
        };
    };
    ctx.unsupported(p, f.unsupported_fields());
    let omit_empty_values = f.omit_empty_values.unwrap_or(false);
    let set = [
        f.text_format.is_some(),
        f.text_format_source.is_some(),
        f.json_format.is_some(),
    ];
    let placeholder = model::LogFormat::Text {
        template: Template::default(),
        omit_empty_values,
    };
    match set.iter().filter(|s| **s).count() {
        0 => {
            ctx.err(
                p,
                "one of text_format_source, text_format or json_format is required",
            );
            return placeholder;
        }
        1 => {}
        _ => {
            ctx.err(
                p,
                "only one of text_format_source, text_format and json_format may be set",
            );
            return placeholder;
        }
    }
    if let Some(text) = &f.text_format {
        let template = template(ctx, &p.f("text_format"), text);
        return model::LogFormat::Text {
            template,
            omit_empty_values,
        };
    }
    if let Some(ds) = &f.text_format_source {
        let sp = p.f("text_format_source");
        let text = text_source(ctx, &sp, ds);
        let template = template(ctx, &sp, &text);
        return model::LogFormat::Text {
            template,
            omit_empty_values,
        };
    }
    let jp = p.f("json_format");
    let fields = match &f.json_format {
        Some(serde_json::Value::Object(map)) => json_fields(ctx, &jp, map),
        _ => {
            ctx.err(&jp, "must be a mapping of keys to format strings");
            Vec::new()
        }
    };
    model::LogFormat::Json {
        fields,
        omit_empty_values,
    }
}

fn json_fields(
    ctx: &mut Ctx,
    p: &P,
    map: &serde_json::Map<String, serde_json::Value>,
) -> Vec<(String, model::JsonTemplate)> {
    map.iter()
        .map(|(k, v)| (k.clone(), json_value(ctx, &p.f(k), v)))
        .collect()
}

fn json_value(ctx: &mut Ctx, p: &P, v: &serde_json::Value) -> model::JsonTemplate {
    use serde_json::Value;
    match v {
        Value::String(s) => model::JsonTemplate::Format(template(ctx, p, s)),
        Value::Number(n) => model::JsonTemplate::Number(n.as_f64().unwrap_or(0.0)),
        Value::Bool(b) => model::JsonTemplate::Bool(*b),
        Value::Null => model::JsonTemplate::Null,
        Value::Object(map) => model::JsonTemplate::Object(json_fields(ctx, p, map)),
        Value::Array(_) => {
            ctx.err(
                p,
                "lists are not supported in json_format (Envoy: only strings, numbers, booleans and nested mappings)",
            );
            model::JsonTemplate::Null
        }
    }
}

/// `text_format_source`: `inline_string`, `inline_bytes` (base64) or `filename`, as text.
fn text_source(ctx: &mut Ctx, p: &P, ds: &raw::DataSource) -> String {
    ctx.unsupported(p, ds.unsupported_fields());
    let set = [
        ds.filename.is_some(),
        ds.inline_string.is_some(),
        ds.inline_bytes.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        ctx.err(
            p,
            "exactly one of filename, inline_string and inline_bytes is required",
        );
        return String::new();
    }
    if let Some(s) = &ds.inline_string {
        return s.clone();
    }
    if let Some(b) = &ds.inline_bytes {
        let bp = p.f("inline_bytes");
        return match decode_base64(b).map(String::from_utf8) {
            Some(Ok(text)) => text,
            Some(Err(_)) => {
                ctx.err(&bp, "is not UTF-8 text");
                String::new()
            }
            None => {
                ctx.err(&bp, "is not valid base64");
                String::new()
            }
        };
    }
    let fp = p.f("filename");
    let file = ds.filename.as_deref().unwrap_or("");
    match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) => {
            ctx.err(&fp, format!("cannot read `{file}`: {e}"));
            String::new()
        }
    }
}

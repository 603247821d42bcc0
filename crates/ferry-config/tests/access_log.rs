//! HCM `access_log[]`: file, stdout and stderr loggers, text and JSON formats, and the
//! errors for everything Ferry does not implement.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use ferry_config::format::{Operator, Segment};
use ferry_config::*;

const ANCHOR: &str = "          stat_prefix: ingress_http\n";

fn with_logs(logs: &str) -> String {
    edit(
        &terminate_h3(),
        ANCHOR,
        &format!("{ANCHOR}          access_log:\n{logs}"),
    )
}

fn logs_of(text: &str) -> Vec<AccessLog> {
    let b = load_yaml(text).unwrap_or_else(|e| panic!("{e}"));
    b.listeners[0].filter_chain.hcm.access_log.clone()
}

const FILE: &str = r#"          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: /var/log/ferry.log
"#;

#[test]
fn file_logger_with_the_default_format() {
    let logs = logs_of(&with_logs(FILE));
    assert_eq!(logs.len(), 1);
    assert_eq!(
        logs[0].sink,
        AccessLogSink::File("/var/log/ferry.log".into())
    );
    match &logs[0].format {
        LogFormat::Text {
            template,
            omit_empty_values: false,
        } => {
            assert_eq!(
                *template,
                format::parse(format::ENVOY_DEFAULT_FORMAT).unwrap()
            );
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn stdout_and_stderr_with_text_and_json_formats() {
    let text = with_logs(
        r#"          - name: envoy.access_loggers.stdout
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
              log_format:
                text_format_source:
                  inline_string: "%RESPONSE_CODE% %DYNAMIC_METADATA(ferry.connect_udp:target)%\n"
          - name: envoy.access_loggers.stderr
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StderrAccessLog
              log_format:
                omit_empty_values: true
                json_format:
                  code: "%RESPONSE_CODE%"
                  n: 5
                  ok: true
                  nested: { up: "%UPSTREAM_HOST%" }
"#,
    );
    let logs = logs_of(&text);
    assert_eq!(logs[0].sink, AccessLogSink::Stdout);
    assert_eq!(logs[1].sink, AccessLogSink::Stderr);
    let LogFormat::Text { template, .. } = &logs[0].format else {
        panic!()
    };
    assert!(matches!(
        &template.segments[0],
        Segment::Command(c) if c.operator == Operator::ResponseCode
    ));
    assert_eq!(
        template.segments.last(),
        Some(&Segment::Literal("\n".into()))
    );
    let LogFormat::Json {
        fields,
        omit_empty_values: true,
    } = &logs[1].format
    else {
        panic!("{:?}", logs[1].format)
    };
    let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["code", "n", "nested", "ok"]);
    assert_eq!(fields[1].1, JsonTemplate::Number(5.0));
    assert_eq!(fields[3].1, JsonTemplate::Bool(true));
    assert!(matches!(&fields[2].1, JsonTemplate::Object(inner) if inner.len() == 1));
}

#[test]
fn text_format_from_inline_bytes() {
    // base64("%PROTOCOL%\n")
    let text = with_logs(
        r#"          - name: envoy.access_loggers.stdout
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
              log_format: { text_format_source: { inline_bytes: "JVBST1RPQ09MJQo=" } }
"#,
    );
    let LogFormat::Text { template, .. } = &logs_of(&text)[0].format else {
        panic!()
    };
    assert_eq!(template.to_string(), "%PROTOCOL%\n");
}

#[test]
fn errors_name_their_paths() {
    let at = |i: usize| format!("{HCM}.access_log[{i}]");
    let text = with_logs(
        r#"          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              log_format:
                text_format_source: { inline_string: "%NOT_AN_OPERATOR% 50%" }
          - name: envoy.access_loggers.http_grpc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig
          - name: envoy.access_loggers.stdout
            filter: { status_code_filter: { comparison: { value: { default_value: 500, runtime_key: k } } } }
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog
              log_format:
                json_format: { a: [1, 2], b: "%DYNAMIC_METADATA(other:key)%" }
          - name: envoy.access_loggers.stderr
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: /tmp/x
              log_format: { text_format: "a", json_format: { a: b } }
"#,
    );
    let errs = errors_of(&text);
    let path = error_at(&errs, &format!("{}.typed_config.path", at(0)));
    assert!(path.message.contains("required"), "{path}");
    let op = error_at(
        &errs,
        &format!("{}.typed_config.log_format.text_format_source", at(0)),
    );
    assert!(op.message.contains("`%NOT_AN_OPERATOR%`"), "{op}");
    let grpc = error_at(&errs, &format!("{}.typed_config.@type", at(1)));
    assert!(
        grpc.message.contains("not supported by Ferry (yet)"),
        "{grpc}"
    );
    assert_eq!(
        error_at(&errs, &format!("{}.filter", at(2))).message,
        NOT_SUPPORTED
    );
    let list = error_at(
        &errs,
        &format!("{}.typed_config.log_format.json_format.a", at(2)),
    );
    assert!(list.message.contains("lists are not supported"), "{list}");
    let ns = error_at(
        &errs,
        &format!("{}.typed_config.log_format.json_format.b", at(2)),
    );
    assert!(ns.message.contains("ferry.connect_udp"), "{ns}");
    let name = error_at(&errs, &format!("{}.name", at(3)));
    assert!(name.message.contains("envoy.access_loggers.file"), "{name}");
    let both = error_at(&errs, &format!("{}.typed_config.log_format", at(3)));
    assert!(both.message.contains("only one of"), "{both}");
}

#[test]
fn unknown_fields_are_errors() {
    let text = with_logs(
        r#"          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: /tmp/x
              log_fromat: {}
"#,
    );
    let e = single_error(&text);
    assert_eq!(
        e.path,
        format!("{HCM}.access_log[0].typed_config.log_fromat")
    );
    assert!(e.message.starts_with("unknown field `log_fromat`"), "{e}");
}

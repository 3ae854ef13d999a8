//! The HTML both status pages share: the node's (`GET /` on its HTTP listener) and
//! the scheduler's. Each page is one self-contained document whose core numbers are
//! rendered here on the server, so they read without JavaScript, and whose charts
//! `status_chart.js` (compiled in) draws from the page's `/status` JSON. The two
//! pages differ in what they show above and below the charts; the execution tables,
//! the number formats and the escaping are the same code, so a queue reads the same
//! on either.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

/// How often a status page's sampler reads the counters.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);

/// How many samples the ring keeps: five minutes at [`SAMPLE_INTERVAL`].
pub const SAMPLES_KEPT: usize = 151;

/// Fills a page template: the server-rendered `head` (above the charts) and `core`
/// (below them), the status for the first drawing of the charts, and the shared chart
/// code.
pub fn page(template: &str, head: &str, core: &str, status: &Value) -> String {
    // `</` cannot appear inside a script element; JSON allows `\/` for `/`.
    let initial = status.to_string().replace("</", "<\\/");
    template
        .replace("<!--head-->", head)
        .replace("<!--core-->", core)
        .replace(
            "<!--initial-->",
            &format!("<script type=\"application/json\" id=\"initial-status\">{initial}</script>"),
        )
        .replace("/*chart-js*/", include_str!("status_chart.js"))
}

/// The queue, workers and what they run, from a scheduler's status; `prefix` is
/// where that status sits in the page's data (for the data-key fields).
pub fn execution_html(status: &Value, prefix: &str) -> String {
    let mut html = String::new();
    let gauges = &status["gauges"];
    html.push_str("<table id=\"queue\">");
    for (label, key) in [
        ("queued actions", "queue_length"),
        ("running tasks", "running"),
        ("workers", "workers"),
        ("task slots", "worker_slots"),
    ] {
        let _ = write!(
            html,
            "<tr><th>{label}</th><td class=\"n\">{}</td></tr>",
            field(
                &format!("{prefix}gauges.{key}"),
                "count",
                gauges[key].as_u64().unwrap_or(0)
            ),
        );
    }
    html.push_str(
        "</table><table id=\"workers\"><thead><tr><th>worker</th><th class=\"n\">running</th>\
         <th>tasks</th></tr></thead><tbody id=\"workers-body\">",
    );
    let workers = status["workers"].as_array().cloned().unwrap_or_default();
    if workers.is_empty() {
        html.push_str("<tr><td colspan=\"3\">no workers connected</td></tr>");
    }
    for worker in &workers {
        let running = worker["running"].as_array().cloned().unwrap_or_default();
        let tasks: Vec<String> = running
            .iter()
            .map(|task| {
                let action = task["action"].as_str().unwrap_or("");
                format!(
                    "<code>{}</code> {}",
                    escape(action.get(..12).unwrap_or(action)),
                    seconds_text(task["running_seconds"].as_f64().unwrap_or(0.0))
                )
            })
            .collect();
        let _ = write!(
            html,
            "<tr><td><code>{}</code>{}</td><td class=\"n\">{} / {}</td><td>{}</td></tr>",
            escape(worker["id"].as_str().unwrap_or("")),
            if worker["draining"].as_bool() == Some(true) {
                " (draining)"
            } else {
                ""
            },
            running.len(),
            worker["max_inflight"].as_u64().unwrap_or(0),
            if tasks.is_empty() {
                "idle".to_string()
            } else {
                tasks.join("<br>")
            },
        );
    }
    html.push_str("</tbody></table>");
    html
}

/// The table of recent finished operations, from a scheduler's status.
pub fn recent_html(status: &Value) -> String {
    let mut html = String::from(
        "<table id=\"recent\"><thead><tr><th>finished</th><th>action</th><th>worker</th>\
         <th>outcome</th><th class=\"n\">exit code</th><th class=\"n\">total</th>\
         <th class=\"n\">on the worker</th></tr></thead><tbody id=\"recent-body\">",
    );
    let recent = status["recent"].as_array().cloned().unwrap_or_default();
    if recent.is_empty() {
        html.push_str("<tr><td colspan=\"7\">none yet</td></tr>");
    }
    for operation in &recent {
        let action = operation["action"].as_str().unwrap_or("");
        let finished = operation["finished_unix_ms"].as_u64().unwrap_or(0) / 1000;
        let _ = write!(
            html,
            "<tr><td>{:02}:{:02}:{:02} UTC</td><td><code>{}</code></td><td><code>{}</code></td>\
             <td title=\"{}\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td></tr>",
            finished / 3600 % 24,
            finished / 60 % 60,
            finished % 60,
            escape(action.get(..16).unwrap_or(action)),
            escape(operation["worker"].as_str().unwrap_or("")),
            escape(operation["message"].as_str().unwrap_or("")),
            escape(operation["outcome"].as_str().unwrap_or("")),
            operation["exit_code"]
                .as_i64()
                .map_or_else(|| "–".to_string(), |code| code.to_string()),
            seconds_text(operation["total_seconds"].as_f64().unwrap_or(0.0)),
            operation["execution_seconds"]
                .as_f64()
                .map_or_else(|| "–".to_string(), seconds_text),
        );
    }
    html.push_str("</tbody></table>");
    html
}

/// A number the page's script keeps up to date: `key` is its path in the status,
/// `format` how `status_chart.js` formats it (and how it is formatted here).
pub fn field(key: &str, format: &str, value: u64) -> String {
    let text = match format {
        "bytes" => bytes_text(value),
        _ => value.to_string(),
    };
    format!(
        "<span data-key=\"{}\" data-format=\"{format}\">{text}</span>",
        escape(key)
    )
}

/// `bytes` in binary units, as the page's script writes them.
pub fn bytes_text(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// An uptime as days, hours, minutes and seconds.
pub fn uptime_text(seconds: u64) -> String {
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    let (hours, rest) = (rest / 3600, rest % 3600);
    let (minutes, seconds) = (rest / 60, rest % 60);
    let mut text = String::new();
    if days > 0 {
        let _ = write!(text, "{days}d ");
    }
    if days > 0 || hours > 0 {
        let _ = write!(text, "{hours}h ");
    }
    let _ = write!(text, "{minutes}m {seconds}s");
    text
}

pub fn seconds_text(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{:.0} ms", seconds * 1000.0)
    } else {
        format!("{seconds:.1} s")
    }
}

/// `text` safe inside HTML elements and attribute values.
pub fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_is_escaped_and_sizes_read_like_the_script_writes_them() {
        assert_eq!(
            escape("<a href=\"x\">&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(bytes_text(1000), "1000 B");
        assert_eq!(bytes_text(3 << 30), "3.0 GiB");
        assert_eq!(uptime_text(59), "0m 59s");
        assert_eq!(uptime_text(90_061), "1d 1h 1m 1s");
    }

    #[test]
    fn the_status_cannot_close_its_script_element() {
        let status = json!({ "evil": "</script><script>alert(1)</script>" });
        let html = page(
            "<!--head--><!--core--><!--initial--><script>/*chart-js*/</script>",
            "",
            "",
            &status,
        );
        assert_eq!(html.matches("</script>").count(), 2, "{html}");
    }
}

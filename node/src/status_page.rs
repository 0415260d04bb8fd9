//! The node's read-only status page (`[[node]] status_page`): one HTML page,
//! rendered on the server from one [`NodeView`], no JavaScript, refreshed by
//! the browser every 10 s. Every text from the topology or from peers is
//! escaped. Colours carry the verdicts (green met / alive, red missed / down,
//! amber suspect / running), each also written out in words.

use std::fmt::Write as _;

use crate::ctl::{bytes, duration, time_ms};
use crate::http::NodeView;

/// RPs listed at most (newest first); the rest are counted.
const MAX_RPS: usize = 200;

/// `text` with `& < > " '` escaped for HTML text and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1f2328;background:#fff}
header{background:#24292f;color:#fff;padding:12px 20px}
header h1{font-size:20px;margin:0 0 4px}
header p{margin:0;color:#d0d7de}
main{padding:8px 20px 24px}
h2{font-size:16px;margin:20px 0 6px}
table{border-collapse:collapse;min-width:50%}
th,td{text-align:left;padding:4px 10px;border-bottom:1px solid #d0d7de;vertical-align:top}
th{background:#f6f8fa}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;white-space:nowrap;padding:1px 8px;border-radius:10px;font-weight:600;color:#fff}
.ok{background:#1a7f37}.bad{background:#cf222e}.warn{background:#9a6700}.none{background:#6e7781}
.bar{width:160px;height:12px;background:#d0d7de;display:inline-block;vertical-align:middle}
.bar span{display:block;height:12px;background:#9a6700}
.muted{color:#656d76}
footer{padding:0 20px 20px;color:#656d76}
";

fn badge(class: &str, text: &str) -> String {
    format!("<span class=\"badge {class}\">{}</span>", escape(text))
}

fn or_dash(v: Option<String>) -> String {
    v.unwrap_or_else(|| "-".into())
}

/// The page for one look at the node.
pub fn render(view: &NodeView) -> String {
    let mut page = String::with_capacity(16 * 1024);
    let title = view.mesh.as_ref().map_or_else(|| "drmesh node".to_string(), |m| format!("drmesh: {} ({})", m.name, m.mesh));
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"10\">\
         <meta name=\"viewport\" content=\"width=device-width\"><title>{}</title><style>{STYLE}</style></head><body>\n",
        escape(&title)
    );
    header(&mut page, view);
    page.push_str("<main>\n");
    volumes(&mut page, view);
    replications(&mut page, view);
    members(&mut page, view);
    peers(&mut page, view);
    recovery_points(&mut page, view);
    store(&mut page, view);
    page.push_str("</main>\n");
    let _ = writeln!(
        page,
        "<footer>Read-only view from this node's own gossip replica, scheduler and store, taken at {}; the page reloads every 10 s. \
         The same figures: <code>drmesh ctl catalog</code>, <code>ctl volumes</code>, <code>ctl mesh</code>.</footer></body></html>",
        time_ms(view.now_unix_ms)
    );
    page
}

fn header(page: &mut String, view: &NodeView) {
    let Some(m) = &view.mesh else {
        page.push_str("<header><h1>drmesh node</h1><p>The node is stopping.</p></header>\n");
        return;
    };
    let _ = writeln!(
        page,
        "<header><h1>{} <span class=\"muted\">in mesh {}</span></h1><p>drmesh {} · up {} · topology version {} ({}) · node id {}</p></header>",
        escape(&m.name),
        escape(&m.mesh),
        escape(m.software_version),
        duration(m.uptime_secs),
        m.topology_version,
        escape(&m.topology_hash),
        escape(&m.node_id),
    );
}

fn volumes(page: &mut String, view: &NodeView) {
    page.push_str("<h2 id=\"volumes\">Volumes</h2>\n");
    let Some(catalog) = &view.catalog else {
        page.push_str("<p>Not available: the node is stopping.</p>\n");
        return;
    };
    if catalog.volumes.is_empty() {
        page.push_str("<p class=\"muted\">No volumes in the topology.</p>\n");
        return;
    }
    page.push_str("<table><tr><th>Volume</th><th>Source</th><th>RPO</th><th>State</th><th>Newest RP</th><th>Age</th><th>RPs</th><th>Drill</th><th>Last error</th></tr>\n");
    for v in &catalog.volumes {
        let state = match (v.rpo_met, v.rpo_missed_by_secs) {
            (Some(true), _) => badge("ok", "RPO met"),
            (Some(false), Some(by)) => badge("bad", &format!("RPO missed by {}", duration(by))),
            (Some(false), None) => badge("bad", "RPO missed"),
            (None, _) => badge("none", "no RP yet"),
        };
        let newest = v.last_seq.map(|seq| format!("{}@{seq}", v.volume));
        let holders = if v.last_holders.is_empty() { String::new() } else { format!(" <span class=\"muted\">on {}</span>", escape(&v.last_holders.join(", "))) };
        let drill = match &v.verification {
            None => "-".to_string(),
            Some(ver) if ver.overdue => badge("bad", "overdue"),
            Some(ver) => match (ver.verified_seq, &ver.last_failure) {
                (_, Some(failure)) => format!("{} {}", badge("bad", "failed"), escape(failure)),
                (Some(seq), None) => format!("{} @{seq}", badge("ok", "passed")),
                (None, None) => badge("none", "not yet"),
            },
        };
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{state}</td><td>{}{holders}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{drill}</td><td>{}</td></tr>",
            escape(v.volume.as_str()),
            escape(&or_dash(v.source.clone())),
            or_dash(v.rpo_secs.map(duration)),
            escape(&or_dash(newest)),
            or_dash(v.last_rp_age_secs.map(duration)),
            v.rp_count,
            escape(&or_dash(v.last_error.clone())),
        );
    }
    page.push_str("</table>\n");
}

fn replications(page: &mut String, view: &NodeView) {
    let Some(list) = &view.replications else { return };
    if list.is_empty() {
        return;
    }
    page.push_str("<h2 id=\"cycles\">Replication from this node</h2>\n");
    page.push_str("<table><tr><th>Volume</th><th>Target</th><th>Now</th><th>Progress</th><th>Last cycle</th><th>Cycles ok / failed</th><th>Next</th></tr>\n");
    for r in list {
        let now = if r.paused_since_unix_ms.is_some() {
            badge("none", "paused")
        } else if r.running {
            badge("warn", "cycle running")
        } else if r.queued {
            badge("none", "queued")
        } else {
            "idle".to_string()
        };
        let progress = match &r.running_progress {
            Some(p) => {
                let eta = p.eta_secs.map_or_else(String::new, |s| format!(", {} left", duration(s.round() as u64)));
                format!(
                    "<span class=\"bar\"><span style=\"width:{:.0}%\"></span></span> {:.0}% of {}, {} sent{eta}",
                    p.percent.clamp(0.0, 100.0),
                    p.percent,
                    bytes(p.volume_bytes),
                    bytes(p.sent_payload_bytes)
                )
            }
            None => "-".to_string(),
        };
        let last = match (&r.last_error, &r.last_ok) {
            (Some(failure), _) => format!("{} {}", badge("bad", "failed"), escape(&failure.reason)),
            (None, Some(ok)) => format!(
                "{} {}@{} in {}, {} sent",
                badge("ok", "ok"),
                escape(ok.report.volume.as_str()),
                ok.report.seq,
                duration(ok.report.duration_secs.round() as u64),
                bytes(ok.report.stats.sent_payload_bytes)
            ),
            (None, None) => "-".to_string(),
        };
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{now}</td><td>{progress}</td><td>{last}</td><td class=\"n\">{} / {}</td><td class=\"n\">{}</td></tr>",
            escape(r.volume.as_str()),
            escape(&r.target),
            r.totals.cycles_ok,
            r.totals.cycles_failed,
            if r.running { "-".to_string() } else { duration(r.next_in_secs.round() as u64) },
        );
    }
    page.push_str("</table>\n");
}

fn members(page: &mut String, view: &NodeView) {
    let Some(members) = &view.members else { return };
    page.push_str("<h2 id=\"members\">Mesh members (gossip)</h2>\n");
    page.push_str("<table><tr><th>Node</th><th>State</th><th>Site</th><th>Version</th><th>Topology</th><th>Last heard</th></tr>\n");
    for m in &members.members {
        let class = match m.state {
            "alive" => "ok",
            "suspect" => "warn",
            "down" => "bad",
            _ => "none",
        };
        let name = m.name.clone().unwrap_or_else(|| m.id.chars().take(12).collect());
        let topology = match m.topology_matches {
            Some(true) => "same file".to_string(),
            Some(false) => format!("{} (differs)", badge("warn", "other file")),
            None => "-".to_string(),
        };
        let _ = writeln!(
            page,
            "<tr><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{topology}</td><td class=\"n\">{}</td></tr>",
            escape(&name),
            if m.is_self { " <span class=\"muted\">(this node)</span>" } else { "" },
            badge(class, m.state),
            escape(&or_dash(m.site.clone())),
            escape(&or_dash(m.software_version.clone())),
            if m.is_self { "-".to_string() } else { or_dash(m.last_heard_secs.map(|s| format!("{} ago", duration(s.round() as u64)))) },
        );
    }
    page.push_str("</table>\n");
}

fn peers(page: &mut String, view: &NodeView) {
    let Some(mesh) = &view.mesh else { return };
    if mesh.peers.is_empty() {
        return;
    }
    page.push_str("<h2 id=\"peers\">Connections of this node</h2>\n");
    page.push_str("<table><tr><th>Peer</th><th>State</th><th>Round trip</th><th>Sent</th><th>Received</th><th>Last error</th></tr>\n");
    for p in &mesh.peers {
        let class = match p.state {
            "connected" => "ok",
            "backoff" => "bad",
            _ => "none",
        };
        let _ = writeln!(
            page,
            "<tr><td>{}</td><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td>{}</td></tr>",
            escape(&p.name),
            badge(class, p.state),
            or_dash(p.rtt_ms.map(|ms| format!("{ms:.1} ms"))),
            bytes(p.sent_bytes),
            bytes(p.received_bytes),
            escape(&or_dash(p.last_error.clone())),
        );
    }
    page.push_str("</table>\n");
}

fn recovery_points(page: &mut String, view: &NodeView) {
    let Some(catalog) = &view.catalog else { return };
    page.push_str("<h2 id=\"rps\">Recovery points</h2>\n");
    if catalog.rps.is_empty() {
        page.push_str("<p class=\"muted\">None yet.</p>\n");
        return;
    }
    let mut rps: Vec<_> = catalog.rps.iter().collect();
    rps.sort_by(|a, b| b.snapshot_unix_ms.cmp(&a.snapshot_unix_ms).then_with(|| a.volume.cmp(&b.volume)));
    page.push_str("<table><tr><th>RP</th><th>Held by</th><th>Taken</th><th>Size</th><th>Consistency</th><th>Drill</th><th>Scrub</th></tr>\n");
    for rp in rps.iter().take(MAX_RPS) {
        let drill = match rp.drill_passed {
            Some(true) => badge("ok", "passed"),
            Some(false) => badge("bad", "failed"),
            None => "-".to_string(),
        };
        let scrub = match &rp.scrub {
            Some(s) if s.sound => badge("ok", "sound"),
            Some(_) => badge("bad", "damaged"),
            None => "-".to_string(),
        };
        let _ = writeln!(
            page,
            "<tr><td>{}@{}</td><td>{}</td><td>{}</td><td class=\"n\">{}</td><td>{}</td><td>{drill}</td><td>{scrub}</td></tr>",
            escape(rp.volume.as_str()),
            rp.seq,
            escape(&rp.holder),
            time_ms(rp.snapshot_unix_ms),
            bytes(rp.size_bytes),
            escape(rp.consistency),
        );
    }
    page.push_str("</table>\n");
    if rps.len() > MAX_RPS {
        let _ = writeln!(page, "<p class=\"muted\">{} older RPs not listed (drmesh ctl catalog lists all).</p>", rps.len() - MAX_RPS);
    }
}

fn store(page: &mut String, view: &NodeView) {
    let Some(s) = &view.store else { return };
    page.push_str("<h2 id=\"store\">This node's store</h2>\n");
    let gc = match view.gc.last_run_unix_ms {
        Some(ms) => format!(
            "last at {}, {} since the node started, {} freed",
            time_ms(ms),
            crate::check::count(usize::try_from(view.gc.runs).unwrap_or(usize::MAX), "run", "runs"),
            bytes(view.gc.bytes_freed)
        ),
        None => "none since the node started".to_string(),
    };
    let _ = writeln!(
        page,
        "<table><tr><th>Recovery points</th><td class=\"n\">{}</td></tr><tr><th>Blobs</th><td class=\"n\">{} ({})</td></tr>\
         <tr><th>Catalog</th><td class=\"n\">{}</td></tr><tr><th>Garbage collection</th><td>{}</td></tr></table>",
        s.rp_count,
        s.blob_count,
        bytes(s.blob_bytes),
        bytes(s.catalog_bytes),
        escape(&gc),
    );
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(escape("<script>alert('x')</script> & \"q\""), "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;");
        assert_eq!(escape("plain-name_1.v"), "plain-name_1.v");
    }
}

//! QMP client core (sans-IO): the JSON protocol of qemu's and
//! qemu-storage-daemon's monitor, as a proxy node drives them to take a
//! point-in-time view of a VM's disk and to manage its dirty bitmaps.
//!
//! The server greets first; the core answers with `qmp_capabilities` and
//! reports [`QmpEvent::Ready`] when that returned. Commands get ids; their
//! `return` or `error` comes back as [`QmpEvent::Return`] or
//! [`QmpEvent::Failed`] with the same id, and asynchronous events
//! (`BLOCK_JOB_CANCELLED`, `JOB_STATUS_CHANGE`...) as [`QmpEvent::Async`].
//! Driving it: write [`QmpClient::poll_transmit`], feed what the socket reads
//! to [`QmpClient::handle_input`], drain [`QmpClient::poll_event`]. A line
//! that is not a QMP message closes it with an error naming the line; no
//! input makes it panic, and it buffers at most [`MAX_LINE_BYTES`].
//!
//! The same core speaks to qemu-guest-agent ([`QmpClient::guest_agent`]),
//! whose protocol is QMP's without a greeting: the agent may still hold
//! answers meant for an earlier client, so the core first sends
//! `guest-sync-delimited` with an id of the caller's choosing and skips
//! everything up to the agent's 0xFF delimiter and that id's answer.

use std::collections::VecDeque;

use serde_json::{json, Value};

/// Longest message line accepted (block-node queries of a big VM are long).
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// Why a QMP connection cannot go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QmpError {
    /// The server sent something that is not QMP.
    #[error("the QMP server sent {0}")]
    Protocol(String),
    /// The server refused the capabilities negotiation.
    #[error("the QMP server refused qmp_capabilities: {0}")]
    Negotiation(String),
}

/// What the connection has to say.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpEvent {
    /// Greeted and negotiated: commands may be sent.
    Ready {
        /// The server's version, "10.0.2".
        version: String,
    },
    /// A command returned.
    Return {
        /// The command's id.
        id: u64,
        /// What it returned.
        value: Value,
    },
    /// A command failed.
    Failed {
        /// The command's id.
        id: u64,
        /// The error class ("GenericError", "DeviceNotFound").
        class: String,
        /// The server's description.
        desc: String,
    },
    /// An asynchronous event.
    Async {
        /// Its name ("BLOCK_JOB_CANCELLED").
        name: String,
        /// Its data.
        data: Value,
    },
}

/// One QMP connection, client side.
pub struct QmpClient {
    inbuf: Vec<u8>,
    out: Vec<u8>,
    events: VecDeque<QmpEvent>,
    next_id: u64,
    greeted: bool,
    ready: bool,
    version: String,
    error: Option<QmpError>,
    /// Guest agent: the id of the sync awaited, and whether its delimiter came.
    agent_sync: Option<(u64, bool)>,
}

/// The id of the `qmp_capabilities` command the core sends itself.
const NEGOTIATION_ID: u64 = 0;

impl Default for QmpClient {
    fn default() -> Self {
        QmpClient::new()
    }
}

impl QmpClient {
    /// A connection whose server has not greeted yet.
    pub fn new() -> QmpClient {
        QmpClient { inbuf: Vec::new(), out: Vec::new(), events: VecDeque::new(), next_id: 1, greeted: false, ready: false, version: String::new(), error: None, agent_sync: None }
    }

    /// A connection to qemu-guest-agent: Ready once the agent answered
    /// `guest-sync-delimited` with `sync_id` (pick it at random, so that an
    /// earlier client's sync is not taken for this one's).
    pub fn guest_agent(sync_id: u64) -> QmpClient {
        let mut c = QmpClient { greeted: true, version: "guest agent".into(), agent_sync: Some((sync_id, false)), ..QmpClient::new() };
        let message = json!({ "execute": "guest-sync-delimited", "arguments": { "id": sync_id } });
        c.out.extend_from_slice(message.to_string().as_bytes());
        c.out.push(b'\n');
        c
    }

    /// Bytes to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        (!self.out.is_empty()).then(|| std::mem::take(&mut self.out))
    }

    /// The next thing to report.
    pub fn poll_event(&mut self) -> Option<QmpEvent> {
        self.events.pop_front()
    }

    /// Why the connection cannot go on, if it cannot.
    pub fn error(&self) -> Option<&QmpError> {
        self.error.as_ref()
    }

    /// Whether commands may be sent.
    pub fn is_ready(&self) -> bool {
        self.ready && self.error.is_none()
    }

    /// Queues command `name` with `arguments` (an object, or null for none);
    /// its answer comes with the returned id.
    pub fn execute(&mut self, name: &str, arguments: Value) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send(name, arguments, id);
        id
    }

    fn send(&mut self, name: &str, arguments: Value, id: u64) {
        let mut message = json!({ "execute": name, "id": id });
        if !arguments.is_null() {
            message["arguments"] = arguments;
        }
        self.out.extend_from_slice(message.to_string().as_bytes());
        self.out.push(b'\n');
    }

    /// Bytes the socket read, in any split.
    pub fn handle_input(&mut self, input: &[u8]) {
        if self.error.is_some() {
            return;
        }
        let mut input = input;
        if let Some((_, delimited @ false)) = &mut self.agent_sync {
            // Whatever came before the delimiter was meant for someone else.
            match input.iter().position(|&b| b == 0xff) {
                Some(at) => {
                    *delimited = true;
                    input = &input[at + 1..];
                }
                None => return,
            }
        }
        self.inbuf.extend_from_slice(input);
        while let Some(end) = self.inbuf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.inbuf.drain(..=end).collect();
            if let Err(e) = self.line(&line) {
                self.error = Some(e);
                self.inbuf.clear();
                return;
            }
        }
        if self.inbuf.len() > MAX_LINE_BYTES {
            self.error = Some(QmpError::Protocol(format!("a line longer than {MAX_LINE_BYTES} bytes")));
            self.inbuf.clear();
        }
    }

    fn line(&mut self, line: &[u8]) -> Result<(), QmpError> {
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        if text.is_empty() {
            return Ok(());
        }
        let shown = || text.chars().take(120).collect::<String>();
        let message: Value = serde_json::from_str(text).map_err(|_| QmpError::Protocol(format!("a line that is not JSON: {}", shown())))?;
        if let Some((sync_id, _)) = self.agent_sync {
            // Until the sync's answer, lines are an earlier client's.
            if message.get("return").and_then(Value::as_u64) == Some(sync_id) && message.get("id").is_none() {
                self.agent_sync = None;
                self.ready = true;
                self.events.push_back(QmpEvent::Ready { version: self.version.clone() });
            }
            return Ok(());
        }
        if let Some(greeting) = message.get("QMP") {
            if self.greeted {
                return Err(QmpError::Protocol("a second greeting".into()));
            }
            self.greeted = true;
            let v = &greeting["version"]["qemu"];
            self.version = format!("{}.{}.{}", v["major"], v["minor"], v["micro"]);
            self.send("qmp_capabilities", Value::Null, NEGOTIATION_ID);
            return Ok(());
        }
        if !self.greeted {
            return Err(QmpError::Protocol(format!("{} before its greeting", shown())));
        }
        if let Some(name) = message.get("event").and_then(Value::as_str) {
            self.events.push_back(QmpEvent::Async { name: name.to_string(), data: message.get("data").cloned().unwrap_or(Value::Null) });
            return Ok(());
        }
        let Some(id) = message.get("id").and_then(Value::as_u64) else {
            return Err(QmpError::Protocol(format!("an answer without our id: {}", shown())));
        };
        if let Some(error) = message.get("error") {
            let class = error.get("class").and_then(Value::as_str).unwrap_or("?").to_string();
            let desc = error.get("desc").and_then(Value::as_str).unwrap_or("").to_string();
            if id == NEGOTIATION_ID {
                return Err(QmpError::Negotiation(desc));
            }
            self.events.push_back(QmpEvent::Failed { id, class, desc });
            return Ok(());
        }
        let Some(value) = message.get("return") else {
            return Err(QmpError::Protocol(format!("an answer with neither return nor error: {}", shown())));
        };
        if id == NEGOTIATION_ID {
            self.ready = true;
            self.events.push_back(QmpEvent::Ready { version: self.version.clone() });
        } else {
            self.events.push_back(QmpEvent::Return { id, value: value.clone() });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;

    #[test]
    fn greeting_negotiation_commands_and_events_in_any_split() {
        let server = format!(
            "{GREETING}\r\n{}\n{}\n{}\n{}\n",
            r#"{"return": {}, "id": 0}"#,
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BLOCK_JOB_CANCELLED", "data": {"device": "fl"}}"#,
            r#"{"id": 2, "error": {"class": "GenericError", "desc": "Export 'view' is not found"}}"#,
            r#"{"return": [{"device": "fl"}], "id": 1}"#,
        );
        for split in [1, 5, 100, usize::MAX] {
            let mut c = QmpClient::new();
            let (a, b) = (c.execute("query-block-jobs", Value::Null), c.execute("block-export-del", json!({"id": "view"})));
            for piece in server.as_bytes().chunks(split) {
                c.handle_input(piece);
            }
            let sent = String::from_utf8(c.poll_transmit().unwrap()).unwrap();
            let lines: Vec<Value> = sent.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            assert_eq!(lines[0], json!({"execute": "query-block-jobs", "id": 1}));
            assert_eq!(lines[1], json!({"execute": "block-export-del", "id": 2, "arguments": {"id": "view"}}));
            assert_eq!(lines[2], json!({"execute": "qmp_capabilities", "id": 0}));
            let events: Vec<QmpEvent> = std::iter::from_fn(|| c.poll_event()).collect();
            assert_eq!(events[0], QmpEvent::Ready { version: "10.0.2".into() });
            assert!(matches!(&events[1], QmpEvent::Async { name, data } if name == "BLOCK_JOB_CANCELLED" && data["device"] == "fl"));
            assert_eq!(events[2], QmpEvent::Failed { id: b, class: "GenericError".into(), desc: "Export 'view' is not found".into() });
            assert_eq!(events[3], QmpEvent::Return { id: a, value: json!([{"device": "fl"}]) });
            assert!(c.is_ready() && c.error().is_none());
        }
    }

    #[test]
    fn what_is_not_qmp_closes_with_the_line() {
        let mut c = QmpClient::new();
        c.handle_input(b"hello\n");
        assert_eq!(c.error().unwrap().to_string(), "the QMP server sent a line that is not JSON: hello");
        let mut c = QmpClient::new();
        c.handle_input(br#"{"return": {}, "id": 3}"#);
        c.handle_input(b"\n");
        assert!(c.error().unwrap().to_string().contains("before its greeting"));
        let mut c = QmpClient::new();
        c.handle_input(format!("{GREETING}\n{}\n", r#"{"id": 0, "error": {"class": "CommandNotFound", "desc": "no"}}"#).as_bytes());
        assert_eq!(c.error(), Some(&QmpError::Negotiation("no".into())));
        assert!(!c.is_ready());
        let mut c = QmpClient::new();
        c.handle_input(&vec![b'x'; MAX_LINE_BYTES + 1]);
        assert!(c.error().is_some());
    }

    #[test]
    fn a_guest_agent_is_synced_past_what_an_earlier_client_left() {
        let mut c = QmpClient::guest_agent(77);
        let sent = String::from_utf8(c.poll_transmit().unwrap()).unwrap();
        assert_eq!(sent, "{\"arguments\":{\"id\":77},\"execute\":\"guest-sync-delimited\"}\n");
        // An earlier client's answers, then the delimiter, then an earlier sync's and ours, split anywhere.
        let mut input = br#"{"return": {}, "id": 1}"#.to_vec();
        input.extend_from_slice(b"\n\xff");
        input.extend_from_slice(b"{\"return\": 5}\n{\"return\": 77}\n");
        for (i, byte) in input.iter().enumerate() {
            c.handle_input(&[*byte]);
            assert_eq!(c.is_ready(), i + 1 == input.len(), "ready after byte {i}");
        }
        assert_eq!(c.poll_event(), Some(QmpEvent::Ready { version: "guest agent".into() }));
        let id = c.execute("guest-fsfreeze-freeze", Value::Null);
        c.handle_input(format!("{{\"return\": 2, \"id\": {id}}}\n").as_bytes());
        assert_eq!(c.poll_event(), Some(QmpEvent::Return { id, value: json!(2) }));
        assert!(c.error().is_none());
    }

    #[test]
    fn any_bytes_never_panic() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let good = format!("{GREETING}\n{}\n{}\n", r#"{"return": {}, "id": 0}"#, r#"{"return": {"a": [1, 2]}, "id": 1}"#).into_bytes();
        for _ in 0..2000 {
            let mut bytes = good.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = next() as u8;
            }
            let mut c = QmpClient::new();
            c.execute("x", Value::Null);
            c.handle_input(&bytes);
            while c.poll_event().is_some() {}
        }
    }
}

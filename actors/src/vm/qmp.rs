//! A small client of the qemu monitor protocol (QMP): JSON lines over a Unix
//! socket, one command at a time, events skipped.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::VmError;

/// Longest line accepted from qemu.
const MAX_LINE_BYTES: usize = 1 << 20;

/// A QMP session in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

fn err(e: impl std::fmt::Display) -> VmError {
    VmError::Qmp(e.to_string())
}

impl Qmp {
    /// Connects to qemu's QMP socket and enters command mode.
    pub fn connect(socket: &Path) -> Result<Qmp, VmError> {
        let stream = UnixStream::connect(socket).map_err(|e| VmError::Qmp(format!("{}: {e}", socket.display())))?;
        stream.set_read_timeout(Some(Duration::from_secs(60))).map_err(err)?;
        let writer = stream.try_clone().map_err(err)?;
        let mut q = Qmp { reader: BufReader::new(stream), writer };
        let greeting = q.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(VmError::Qmp(format!("unexpected greeting {greeting}")));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<Value, VmError> {
        let mut line = String::new();
        let n = (&mut self.reader).take(MAX_LINE_BYTES as u64).read_line(&mut line).map_err(err)?;
        if n == 0 {
            return Err(VmError::Qmp("qemu closed the monitor".into()));
        }
        serde_json::from_str(&line).map_err(|e| VmError::Qmp(format!("bad message from qemu ({e})")))
    }

    /// Runs `command` with `arguments` and returns its `return` value; a qemu
    /// error is an error carrying qemu's description.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, VmError> {
        let mut line = json!({ "execute": command, "arguments": arguments }).to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes()).map_err(err)?;
        loop {
            let msg = self.read_message()?;
            if msg.get("event").is_some() {
                continue;
            }
            if let Some(r) = msg.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = msg.get("error") {
                return Err(VmError::Qmp(format!("{command}: {}", e["desc"].as_str().unwrap_or("failed"))));
            }
        }
    }
}

//! The servers under test, started in a temp directory and stopped by PID:
//! `rld` with one rule covering the bench keys, and `redis-server` (no
//! persistence, Unix socket only) with the redis-cell module loaded.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// A token bucket in Lua, as commonly deployed: refill by elapsed time, take
/// the cost if available, remember tokens and time in a hash with a TTL.
pub const LUA_TOKEN_BUCKET: &str = r#"
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
tokens = math.min(burst, tokens + (now - ts) * rate)
local allowed = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return allowed
"#;

/// SIGTERM this child only, then SIGKILL after 5 s.
fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

async fn wait_for_socket(path: &Path, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if UnixStream::connect(path).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("server exited early: {status}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("{} did not appear", path.display())
}

pub struct Rld {
    child: Child,
    pub socket: PathBuf,
}

impl Rld {
    pub async fn start(bin: &Path, dir: &Path, rate: u64, burst: u64) -> anyhow::Result<Rld> {
        let socket = dir.join("rld.sock");
        let mut child = Command::new(bin)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("rld-state"))
            .args(["--log-level", "warn"])
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        wait_for_socket(&socket, &mut child).await?;
        let mut rule =
            rld::rule::RuleSpec::new("bench", "bench-*", "bench", rate, Duration::from_secs(1));
        rule.burst = Some(burst);
        rld::protocol::Connection::connect(&socket)
            .await?
            .rule_set(vec![rule])
            .await?;
        Ok(Rld { child, socket })
    }
}

impl Drop for Rld {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

pub struct Redis {
    child: Child,
    pub socket: PathBuf,
}

impl Redis {
    pub async fn start(bin: &Path, cell_module: &Path, dir: &Path) -> anyhow::Result<Redis> {
        let socket = dir.join("redis.sock");
        let mut child = Command::new(bin)
            .args([
                "--port",
                "0",
                "--save",
                "",
                "--appendonly",
                "no",
                "--unixsocketperm",
                "700",
            ])
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--loadmodule")
            .arg(cell_module)
            .arg("--dir")
            .arg(dir)
            .stdout(std::fs::File::create(dir.join("redis.log"))?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        if let Err(e) = wait_for_socket(&socket, &mut child).await {
            let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
            bail!("redis-server: {e}\n{log}");
        }
        Ok(Redis { child, socket })
    }

    /// `SCRIPT LOAD`, returning the sha.
    pub async fn load_script(&self, script: &str) -> anyhow::Result<String> {
        let mut s = UnixStream::connect(&self.socket).await?;
        let cmd = format!(
            "*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n${}\r\n{script}\r\n",
            script.len()
        );
        s.write_all(cmd.as_bytes()).await?;
        let mut buf = vec![0u8; 256];
        let n = s.read(&mut buf).await?;
        let reply = std::str::from_utf8(&buf[..n])?;
        // "$40\r\n<sha>\r\n"
        let sha = reply
            .lines()
            .nth(1)
            .filter(|_| reply.starts_with('$'))
            .with_context(|| format!("SCRIPT LOAD answered {reply:?}"))?;
        Ok(sha.to_owned())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

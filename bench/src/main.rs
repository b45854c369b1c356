//! `loadgen`: the load generator of the ssehub benchmark (issue 6).
//!
//! The coordinating process starts one or more client processes (itself, with
//! `--child-index`), each holding a share of the SSE clients on a single-threaded runtime, and
//! drives them over stdin/stdout lines:
//!
//! ```text
//! child -> READY {..}            all of its clients are connected (or failed)
//! coord -> GO                    measurement window starts (children mark their counters)
//! coord -> DROP <published>      resume mode: drop every client and reconnect with Last-Event-ID
//!                                (with --kill-pid the coordinator has SIGKILLed the server first)
//! child -> RESUMED               every reconnected client has caught up (or failed)
//! coord -> STOP <published>      drain, then report
//! child -> RESULT {..}           the child's figures (JSON)
//! ```
//!
//! The coordinator publishes, reads the server's CPU and memory from /proc and prints one JSON
//! document.

mod cli;
mod client;
mod procfs;
mod publish;
mod stats;
mod wire;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::process::{ExitCode, Stdio};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

use cli::{Args, Mode, Publish};
use client::{merge_pairs, ChildResult, Verified, Worker};
use stats::summary_ms;

fn main() -> ExitCode {
    let args = Args::parse();
    let nofile = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            eprintln!("loadgen: cannot raise RLIMIT_NOFILE: {e}");
            0
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("loadgen: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    match args.child_index {
        Some(index) => match local.block_on(&runtime, child_main(args, index)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("loadgen child {index}: {e}");
                ExitCode::FAILURE
            }
        },
        None => {
            let check = args.check;
            match local.block_on(&runtime, coordinate(args, nofile)) {
                Ok(report) => {
                    if check && report["ok"] != Value::Bool(true) {
                        eprintln!("loadgen: check failed: {}", report["problems"]);
                        return ExitCode::FAILURE;
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("loadgen: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// A client process: connect, then follow the coordinator's commands.
async fn child_main(args: Args, index: usize) -> Result<(), String> {
    let args = Rc::new(args);
    let clients = args.share(index, args.child_count);
    let worker = Worker::new(args.clone(), clients)?;
    let connect_s = worker.connect_all().await;
    say(&format!("READY {}", json!({ "connect_s": connect_s })));
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut cpu_at_go = procfs::cpu_of("self")?;
    let mut resume = None;
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(|e| format!("stdin: {e}"))?
            .ok_or("the coordinator went away")?;
        let (command, value) = line.split_once(' ').unwrap_or((line.as_str(), "0"));
        let value: u64 = value
            .trim()
            .parse()
            .map_err(|_| format!("bad command {line:?}"))?;
        match command {
            "GO" => {
                worker.mark();
                cpu_at_go = procfs::cpu_of("self")?;
            }
            "DROP" => {
                resume = Some(worker.drop_and_resume(value).await);
                say("RESUMED");
            }
            "STOP" => {
                let drain_s = worker.drain(value).await;
                let mut result = worker.result(value, connect_s);
                let cpu = procfs::cpu_of("self")?;
                result.drain_s = drain_s;
                result.cpu_window_s = cpu.minus(&cpu_at_go).total();
                result.cpu_total_s = cpu.total();
                result.resume = resume.take();
                worker.close_all();
                let encoded = serde_json::to_string(&result).map_err(|e| e.to_string())?;
                say(&format!("RESULT {encoded}"));
                return Ok(());
            }
            _ => return Err(format!("unknown command {line:?}")),
        }
    }
}

fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// The client processes and their line protocol.
struct Children {
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    lines: mpsc::UnboundedReceiver<(usize, Option<String>)>,
}

impl Children {
    fn spawn(count: usize) -> Result<Children, String> {
        let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
        let argv: Vec<String> = std::env::args().skip(1).collect();
        let (tx, lines) = mpsc::unbounded_channel();
        let mut children = Vec::new();
        let mut stdins = Vec::new();
        for index in 0..count {
            let mut child = Command::new(&exe)
                .args(&argv)
                .arg("--child-index")
                .arg(index.to_string())
                .arg("--child-count")
                .arg(count.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("spawn client process: {e}"))?;
            let stdout = child.stdout.take().ok_or("child stdout")?;
            stdins.push(child.stdin.take().ok_or("child stdin")?);
            let tx = tx.clone();
            tokio::task::spawn_local(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if tx.send((index, Some(line))).is_err() {
                        return;
                    }
                }
                let _ = tx.send((index, None));
            });
            children.push(child);
        }
        Ok(Children {
            children,
            stdins,
            lines,
        })
    }

    async fn broadcast(&mut self, line: &str) -> Result<(), String> {
        for stdin in &mut self.stdins {
            stdin
                .write_all(format!("{line}\n").as_bytes())
                .await
                .map_err(|e| format!("to client process: {e}"))?;
            stdin.flush().await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Waits for one `word` line from every child; returns the rest of each line.
    async fn expect(&mut self, word: &str, limit: Duration) -> Result<Vec<String>, String> {
        let deadline = Instant::now() + limit;
        let mut got: Vec<Option<String>> = vec![None; self.stdins.len()];
        while got.iter().any(Option::is_none) {
            let next = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .map_err(|_| format!("timed out waiting for {word} from the client processes"))?
                .ok_or("client process channel closed")?;
            match next {
                (index, Some(line)) => {
                    let (head, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
                    if head == word {
                        got[index] = Some(rest.to_string());
                    } else {
                        eprintln!("loadgen: client process {index}: unexpected {line:?}");
                    }
                }
                (index, None) => {
                    return Err(format!(
                        "client process {index} exited while waiting for {word}"
                    ))
                }
            }
        }
        Ok(got.into_iter().flatten().collect())
    }

    async fn wait(mut self) {
        drop(self.stdins);
        for child in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The coordinating process; returns the report (also printed and written to `--out`).
async fn coordinate(args: Args, nofile: u64) -> Result<Value, String> {
    let started_unix = unix_now();
    let pids = args.server_pids.clone();
    if let Some(pid) = args.kill_pid {
        if pids.iter().any(|p| i64::from(*p) == i64::from(pid)) {
            return Err(format!(
                "--kill-pid {pid} is also a --server-pid: its /proc entry goes away mid-run"
            ));
        }
    }
    let memory_idle = procfs::memory_sum(&pids)?;
    let tcp_before = procfs::tcp_counters();
    let processes = args.process_count();
    let mut children = Children::spawn(processes)?;
    let connect_limit = Duration::from_secs_f64(
        args.clients as f64 / args.connect_rate.max(1.0) + args.connect_timeout + 30.0,
    );
    children.expect("READY", connect_limit).await?;
    // The publisher connects before the window so its set-up is not measured.
    let mut sink = match (args.mode, args.publish) {
        (Mode::Idle, _) | (_, Publish::None) => None,
        _ => Some(publish::Sink::connect(&args).await?),
    };
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;

    let memory_connected = procfs::memory_sum(&pids)?;
    let server_cpu_start = procfs::cpu_sum(&pids)?;
    let own_cpu_start = procfs::cpu_of("self")?;
    let system_busy_start = procfs::system_busy_s();
    let load_start = procfs::load_average();
    children.broadcast("GO").await?;
    let window_start = Instant::now();
    let published = Rc::new(Cell::new(0u64));
    let mut kill_to_resumed = None;
    let publish_stats = match sink.as_mut() {
        None => {
            tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
            None
        }
        Some(sink) if args.mode == Mode::Resume => {
            let publishing = publish::run(&args, sink, &published);
            tokio::pin!(publishing);
            let drop_at = window_start + Duration::from_secs_f64(args.drop_at());
            let stats = tokio::select! {
                stats = &mut publishing => Some(stats),
                _ = tokio::time::sleep_until(drop_at) => None,
            };
            let killed_at = kill_server(&args)?;
            children
                .broadcast(&format!("DROP {}", published.get()))
                .await?;
            let resumed = async {
                let resumed = children.expect("RESUMED", resume_limit(&args)).await;
                (resumed, Instant::now())
            };
            let (stats, (resumed, resumed_at)) = match stats {
                Some(stats) => (stats, resumed.await),
                None => tokio::join!(publishing, resumed),
            };
            resumed?;
            kill_to_resumed = killed_at.map(|at| resumed_at.duration_since(at).as_secs_f64());
            Some(stats)
        }
        Some(sink) => Some(publish::run(&args, sink, &published).await),
    };
    let publish_s = window_start.elapsed().as_secs_f64();
    children
        .broadcast(&format!("STOP {}", published.get()))
        .await?;
    let drain_limit = Duration::from_secs_f64(args.drain + 60.0);
    let results: Vec<ChildResult> = children
        .expect("RESULT", drain_limit)
        .await?
        .iter()
        .map(|line| serde_json::from_str(line).map_err(|e| format!("child result: {e}")))
        .collect::<Result<_, _>>()?;
    let window_s = window_start.elapsed().as_secs_f64();
    let server_cpu = procfs::cpu_sum(&pids)?.minus(&server_cpu_start);
    let memory_end = procfs::memory_sum(&pids)?;
    let own_cpu_window = procfs::cpu_of("self")?.minus(&own_cpu_start).total();
    let system_busy_s = procfs::system_busy_s() - system_busy_start;
    let load_end = procfs::load_average();
    children.wait().await;
    let own_cpu_total = procfs::cpu_of("self")?.total();
    let tcp = procfs::counter_delta(&tcp_before, &procfs::tcp_counters());

    let report = build_report(Inputs {
        args: &args,
        started_unix,
        nofile,
        processes,
        results: &results,
        publish: publish_stats.as_ref(),
        published: published.get(),
        publish_s,
        window_s,
        kill_to_resumed,
        server_cpu,
        memory: [memory_idle, memory_connected, memory_end],
        generator_cpu_window: own_cpu_window + results.iter().map(|r| r.cpu_window_s).sum::<f64>(),
        generator_cpu_total: own_cpu_total,
        tcp,
        system: json!({
            "busy_cpu_s_window": system_busy_s,
            "load_average_start": load_start,
            "load_average_end": load_end,
        }),
    });
    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    println!("{text}");
    if let Some(path) = &args.out {
        std::fs::write(path, format!("{text}\n"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(report)
}

/// `--kill-pid`: SIGKILLs that process (a gateway instance lost); returns when.
fn kill_server(args: &Args) -> Result<Option<Instant>, String> {
    let Some(pid) = args.kill_pid else {
        return Ok(None);
    };
    let at = Instant::now();
    // SAFETY: kill(2) only sends a signal to a process id; no memory is involved.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
    if rc != 0 {
        return Err(format!(
            "kill -KILL {pid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(Some(at))
}

fn resume_limit(args: &Args) -> Duration {
    Duration::from_secs_f64(args.connect_timeout + 60.0)
}

struct Inputs<'a> {
    args: &'a Args,
    started_unix: f64,
    nofile: u64,
    processes: usize,
    results: &'a [ChildResult],
    publish: Option<&'a publish::PublishStats>,
    published: u64,
    publish_s: f64,
    window_s: f64,
    /// `--kill-pid`: seconds from the SIGKILL until every client process reported its clients
    /// resumed (or failed).
    kill_to_resumed: Option<f64>,
    server_cpu: procfs::Cpu,
    memory: [procfs::Memory; 3],
    generator_cpu_window: f64,
    generator_cpu_total: f64,
    tcp: BTreeMap<String, i64>,
    system: Value,
}

fn build_report(input: Inputs<'_>) -> Value {
    let args = input.args;
    let results = input.results;
    let sum = |f: fn(&ChildResult) -> u64| results.iter().map(f).sum::<u64>();
    let connected = sum(|r| r.connected);
    let connect_errors = sum(|r| r.connect_errors);
    let mut error_kinds: BTreeMap<String, u64> = BTreeMap::new();
    for result in results {
        for (kind, count) in &result.error_kinds {
            *error_kinds.entry(kind.clone()).or_insert(0) += count;
        }
    }
    let mut sample = Verified::default();
    let mut verified = Verified::default();
    for result in results {
        sample.add(&result.sample);
        verified.add(&result.verified_all);
    }
    let expected = sum(|r| r.expected);
    let received = sum(|r| r.received);
    let lost = sum(|r| r.lost);
    let extra = sum(|r| r.extra);
    let closed_early = sum(|r| r.closed_early);
    let latency = merge_pairs(results.iter().map(|r| &r.latency_us));
    let connect_time = merge_pairs(results.iter().map(|r| &r.connect_us));
    let connect_phase_s = results
        .iter()
        .map(|r| r.connect_phase_s)
        .fold(0.0, f64::max);

    let [idle, connected_memory, end] = input.memory;
    let per_connection_kib = if connected > 0 && !args.server_pids.is_empty() {
        Some((connected_memory.rss_kib as f64 - idle.rss_kib as f64) / connected as f64)
    } else {
        None
    };
    let projected_gib =
        per_connection_kib.map(|kib| (idle.rss_kib as f64 + kib * 1_000_000.0) / (1024.0 * 1024.0));
    let server_cpu_s = input.server_cpu.total();
    let per_million = |cpu: f64| (received > 0).then(|| cpu / (received as f64 / 1e6));

    let mut problems = Vec::new();
    if connect_errors > 0 {
        problems.push(format!("{connect_errors} connect errors: {error_kinds:?}"));
    }
    if lost > 0 {
        problems.push(format!("{lost} events lost"));
    }
    if extra > 0 {
        problems.push(format!("{extra} duplicate or unexpected events"));
    }
    if verified.out_of_order > 0 {
        problems.push(format!("{} events out of order", verified.out_of_order));
    }
    if verified.duplicates > 0 {
        problems.push(format!("{} duplicates (verified)", verified.duplicates));
    }
    if closed_early > 0 && args.mode != Mode::Resume {
        problems.push(format!("{closed_early} streams ended early"));
    }
    if let Some(stats) = input.publish {
        if stats.errors > 0 || stats.published < stats.planned {
            problems.push(format!(
                "publisher: {} of {} sent, {} errors",
                stats.published, stats.planned, stats.errors
            ));
        }
    }
    let heartbeats = (args.mode == Mode::Idle).then(|| {
        let open_at_mark: u64 = sum(|r| r.heartbeats.open_at_mark);
        let open_at_end: u64 = sum(|r| r.heartbeats.open_at_end);
        let with_data: u64 = sum(|r| r.heartbeats.with_data_after_mark);
        if with_data < args.clients as u64 {
            problems.push(format!(
                "{} of {} clients received no heartbeat in the window",
                args.clients as u64 - with_data,
                args.clients
            ));
        }
        json!({
            "window_s": args.duration,
            "open_at_mark": open_at_mark,
            "open_at_end": open_at_end,
            "clients_with_heartbeat": with_data,
            "sampled_open": sum(|r| r.heartbeats.sampled_open),
            "sampled_with_comment": sum(|r| r.heartbeats.sampled_with_comment),
        })
    });
    let resume = (args.mode == Mode::Resume).then(|| {
        let parts: Vec<_> = results.iter().filter_map(|r| r.resume.as_ref()).collect();
        let total = |f: fn(&client::ResumeStats) -> u64| parts.iter().map(|p| f(p)).sum::<u64>();
        let clients = total(|p| p.clients);
        let resumed = total(|p| p.resumed);
        if resumed < clients || clients < args.clients as u64 {
            problems.push(format!("{resumed} of {} clients resumed", args.clients));
        }
        let reconnect = merge_pairs(parts.iter().map(|p| &p.reconnect_us));
        let caught_up = merge_pairs(parts.iter().map(|p| &p.resume_us));
        let all_resumed = resumed == clients && clients > 0;
        json!({
            "drop_at_s": args.drop_at(),
            "killed_pid": args.kill_pid,
            "resume_target": args.resume_target,
            "kill_to_all_resumed_s": input.kill_to_resumed.filter(|_| all_resumed),
            "clients": clients,
            "reconnected": total(|p| p.reconnected),
            "resumed": resumed,
            "failed": total(|p| p.failed),
            "published_before_drop": parts.first().map_or(0, |p| p.published_before_drop),
            "generator_closed_ms": parts.iter().map(|p| p.closed_ms).fold(0.0, f64::max),
            "generator_spawned_ms": parts.iter().map(|p| p.spawned_ms).fold(0.0, f64::max),
            "reconnect_ms": summary_ms(&reconnect),
            "resume_ms": summary_ms(&caught_up),
            "all_resumed_s": if all_resumed {
                Value::from(caught_up.max() as f64 / 1e6)
            } else {
                Value::Null
            },
        })
    });
    let labels: BTreeMap<String, String> = args
        .labels
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (l.clone(), String::new()),
        })
        .collect();
    json!({
        "tool": concat!("loadgen ", env!("CARGO_PKG_VERSION")),
        "labels": labels,
        "args": args,
        "started_unix": input.started_unix,
        "rlimit_nofile": input.nofile,
        "processes": input.processes,
        "clients": args.clients,
        "connect": {
            "connected": connected,
            "errors": connect_errors,
            "error_kinds": error_kinds,
            "phase_s": connect_phase_s,
            "time_ms": summary_ms(&connect_time),
        },
        "publish": input.publish,
        "delivery": {
            "published": input.published,
            "expected": expected,
            "received": received,
            "lost": lost,
            "duplicates_or_extra": extra,
            "out_of_order": verified.out_of_order,
            "incomplete_connections": sum(|r| r.incomplete_connections),
            "closed_early": closed_early,
            "publish_s": input.publish_s,
            "window_s": input.window_s,
            "delivered_per_s": received as f64 / input.publish_s.max(1e-9),
            "drain_s": results.iter().map(|r| r.drain_s).fold(0.0, f64::max),
        },
        "sample": sample,
        "verified": verified,
        "latency_ms": summary_ms(&latency),
        "heartbeats": heartbeats,
        "resume": resume,
        "server": {
            "pids": args.server_pids,
            "cpu_s": server_cpu_s,
            "cpu": input.server_cpu,
            "cpu_s_per_million_events": per_million(server_cpu_s),
            "cpu_utilisation": server_cpu_s / input.window_s.max(1e-9),
            "memory_kib": { "idle": idle, "connected": connected_memory, "end": end },
            "kib_per_connection": per_connection_kib,
            "projected_gib_for_1m_clients": projected_gib,
        },
        "generator": {
            "processes": input.processes,
            "cpu_s_window": input.generator_cpu_window,
            "cpu_utilisation": input.generator_cpu_window / input.window_s.max(1e-9),
            "cpu_s_total": input.generator_cpu_total,
            "cpu_s_per_million_events": per_million(input.generator_cpu_window),
        },
        "kernel_tcp": input.tcp,
        "system": input.system,
        "ok": problems.is_empty(),
        "problems": problems,
    })
}

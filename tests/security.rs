//! Nobody in who wasn't invited: a running job on a real coordinator and two workers, then
//! every way in that a stranger on the LAN has. Each is refused (and the coordinator logs it),
//! the job keeps training, and the next job starts at once.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use swarm_proto::trust::{self, Secret, Token, TokenKind};
use swarm_proto::v1 as pb;
use swarm_proto::v1::coordinator_client::CoordinatorClient;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_swarm");

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).stdin(Stdio::null()).output().unwrap()
}

struct Killed(Vec<Child>);
impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn dataset(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = dir.join("dataset");
    let mut args: Vec<String> = ["data", "prepare", "--vocab-size", "300", "--max-bytes", "200000", "--json", "--out"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push(out.display().to_string());
    for f in ["coordinator/src/machine.rs", "worker/src/daemon.rs", "sharding/src/recipe.rs"] {
        args.extend(["--input".to_string(), root.join(f).display().to_string()]);
    }
    let o = Command::new(BIN).args(&args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn recipe(dir: &Path, name: &str, steps: u64, ds: &Path) -> PathBuf {
    let p = dir.join(format!("{name}.yaml"));
    let yaml = format!(
        "name: {name}\nmodel: {{ preset: tiny, hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2, num_kv_heads: 1 }}\n\
         data: {{ dataset: {} }}\ntrain: {{ steps: {steps}, seq_len: 16, global_batch: 4, lr: 0.01 }}\n\
         checkpoint: {{ dir: {}, every: 1000000, keep: 1 }}\n",
        ds.display(),
        dir.join(format!("ck-{name}")).display()
    );
    std::fs::write(&p, yaml).unwrap();
    p
}

async fn tls_channel(addr: &str, pin: trust::Pin) -> tonic::transport::Channel {
    trust::connect_channel(&[addr.to_string()], pin).await.unwrap().0
}

fn assert_refused<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, what: &str) {
    match r {
        Ok(v) => panic!("{what} was accepted: {v:?}"),
        Err(s) => assert_eq!(s.code(), code, "{what}: {}", s.message()),
    }
}

fn status_json(admin: &str, addr: &str) -> serde_json::Value {
    let o = run(&["status", "--token", admin, "--coordinator", addr, "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn step_of(admin: &str, addr: &str) -> u64 {
    status_json(admin, addr)["jobs"][0]["step"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_and_the_running_job_is_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let ds = dataset(dir);
    let state = dir.join("state");
    let log = std::fs::File::create(dir.join("coordinator.log")).unwrap();
    let mut up = Command::new(BIN)
        .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&state)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(up.stdout.take().unwrap()), &mut line).unwrap();
    let addr = line.split_whitespace().nth(4).unwrap().to_string();
    let mut procs = Killed(vec![up]);
    let read = |f: &str| std::fs::read_to_string(state.join("identity").join(f)).unwrap();
    let (join, admin) = (read("join.token"), read("admin.token"));
    let pin = Token::decode(&join).unwrap().pin;
    for name in ["a", "b"] {
        procs.0.push(
            Command::new(BIN)
                .args([
                    "worker",
                    "--join",
                    &join,
                    "--coordinator",
                    &addr,
                    "--name",
                    name,
                    "--data-listen",
                    "127.0.0.1:0",
                    "--state-dir",
                ])
                .arg(dir.join(format!("worker-{name}")))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    let long = recipe(dir, "long", 1_000_000, &ds);
    let mut train = Command::new(BIN)
        .args(["train", "--token", &admin, "--coordinator", &addr, "--nodes", "2", "--recipe"])
        .arg(&long)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while step_of(&admin, &addr) < 3 {
        assert!(Instant::now() < deadline, "the job did not reach step 3");
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = status_json(&admin, &addr);
    let job = status["jobs"][0]["job_id"].as_u64().unwrap();
    let workers = status["workers"].as_array().unwrap().clone();
    let real_worker = workers[0]["worker_id"].as_u64().unwrap();
    let data_addrs: Vec<String> = workers.iter().map(|w| w["data_addr"].as_str().unwrap().to_string()).collect();

    // A plaintext client: the TLS port does not speak to it.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await;
    if let Ok(ch) = plain {
        assert!(CoordinatorClient::new(ch).status(pb::ListJobsRequest {}).await.is_err(), "plaintext status answered");
    }
    // A client without the admin token (none, a wrong one, the join token) cannot list, submit or cancel.
    let ch = tls_channel(&addr, pin).await;
    let mut anon = CoordinatorClient::new(ch.clone());
    assert_refused(anon.status(pb::ListJobsRequest {}).await, Code::Unauthenticated, "status without a token");
    let join_secret = Token::decode(&join).unwrap().secret;
    for secret in [Secret::random(), join_secret] {
        let mut c = trust::client(ch.clone(), &secret);
        let submit = pb::SubmitJobRequest { recipe_json: "{}".into(), nodes: 1, ..Default::default() };
        assert_refused(c.submit_job(submit).await, Code::Unauthenticated, "submit with a wrong token");
        let cancel = pb::CancelJobRequest { job_id: job, reason: "x".into() };
        assert_refused(c.cancel_job(cancel).await, Code::Unauthenticated, "cancel with a wrong token");
    }
    // Registering without the join token, or with a wrong one.
    let reg = || pb::RegisterWorkerRequest {
        name: "fake-h100".into(),
        devices: vec![pb::Device {
            kind: "cuda".into(),
            name: "H100".into(),
            measured_tflops: 900.0,
            ..Default::default()
        }],
        data_addr: "127.0.0.1:1".into(),
        version: "0".into(),
    };
    assert_refused(anon.register_worker(reg()).await, Code::Unauthenticated, "register without a token");
    let mut wrong = trust::client(ch.clone(), &Secret::random());
    assert_refused(wrong.register_worker(reg()).await, Code::Unauthenticated, "register with a wrong token");
    // A process that did join (it has a credential of its own) cannot act for another worker.
    let mine = trust::client(ch.clone(), &join_secret).register_worker(reg()).await.unwrap().into_inner();
    let mut me = trust::client(ch.clone(), &Secret::from_hex(&mine.credential).unwrap());
    let watch = pb::WatchAssignmentsRequest { worker_id: real_worker };
    assert_refused(me.watch_assignments(watch).await.map(|_| ()), Code::Unauthenticated, "another worker's stream");
    let forged = |worker_id| pb::StepReport {
        job_id: job,
        worker_id,
        rank: 0,
        step: 4,
        loss: 0.001,
        tokens: 1_000_000_000,
        attempt: 1,
        ..Default::default()
    };
    assert_refused(
        me.report_step(forged(real_worker)).await,
        Code::Unauthenticated,
        "a step report for another worker",
    );
    assert_refused(
        me.report_step(forged(mine.worker_id)).await,
        Code::PermissionDenied,
        "a step report from outside the job",
    );
    let result = pb::WorkerJobResult {
        job_id: job,
        worker_id: real_worker,
        ok: false,
        error: "forged".into(),
        attempt: 1,
        ..Default::default()
    };
    assert_refused(me.report_job_result(result).await, Code::Unauthenticated, "a job result for another worker");
    let hb = pb::HeartbeatRequest { worker_id: real_worker };
    assert_refused(me.heartbeat(hb).await, Code::Unauthenticated, "another worker's heartbeat");

    // 200 data-plane connections without the job's secret, and random bytes on every port.
    let mut junk = Vec::new();
    for i in 0..200usize {
        if let Ok(mut s) = TcpStream::connect(&data_addrs[i % 2]) {
            let bytes: Vec<u8> = (0..64).map(|j| (i * 131 + j * 7) as u8).collect();
            let _ = s.write_all(&bytes);
            junk.push(s);
        }
    }
    for a in data_addrs.iter().chain([&addr]) {
        let mut s = TcpStream::connect(a).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let bytes: Vec<u8> = (0..4096u32).map(|j| (j.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let _ = s.write_all(&bytes);
        let mut buf = [0u8; 64];
        let _ = s.read(&mut buf); // closed, or a TLS alert: never an answer that matters
    }
    drop(junk);
    // Fetching what a worker holds (the job's dataset, its checkpoints) without the cluster's
    // fetch secret gets nothing: the worker's side of the challenge fails first.
    let stranger = swarm_worker::comm::fetch::Fetcher::new(Secret::random());
    for a in &data_addrs {
        let e = stranger.get_small(a, "checkpoints/long/step-000001/rank-00000.json", 1 << 16).unwrap_err();
        assert!(format!("{e:#}").contains("does not hold this cluster's fetch secret"), "{e:#}");
    }

    // The job trained on through all of it, with its two real workers.
    let before = step_of(&admin, &addr);
    let deadline = Instant::now() + Duration::from_secs(60);
    while step_of(&admin, &addr) < before + 3 {
        assert!(Instant::now() < deadline, "the job stopped advancing");
        assert!(train.try_wait().unwrap().is_none(), "the job ended");
        std::thread::sleep(Duration::from_millis(200));
    }
    let s = status_json(&admin, &addr);
    assert_eq!(s["jobs"][0]["state"], "running", "{s}");
    assert!(s["jobs"][0]["tokens_per_s"].as_f64().unwrap() < 1e7, "a forged report counted: {s}");
    // The admin cancels it; the next job starts at once on the same workers and succeeds.
    let mut admin_client = trust::client(ch.clone(), &Token::decode_kind(&admin, TokenKind::Admin).unwrap().secret);
    admin_client.cancel_job(pb::CancelJobRequest { job_id: job, reason: "test over".into() }).await.unwrap();
    assert!(!train.wait().unwrap().success());
    let short = recipe(dir, "short", 3, &ds);
    let t = Instant::now();
    let o =
        run(&["train", "--token", &admin, "--coordinator", &addr, "--nodes", "2", "--recipe", short.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(t.elapsed() < Duration::from_secs(60), "the next job took {:?}", t.elapsed());
    let log = std::fs::read_to_string(dir.join("coordinator.log")).unwrap();
    for needle in ["refused a request with no secret", "refused a request with a wrong secret"] {
        assert!(log.contains(needle), "the coordinator did not log {needle:?}:\n{log}");
    }
}

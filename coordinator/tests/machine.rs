//! The job state machine, driven without tokio: time is a number we pass in.

use swarm_coordinator::job::JobState;
use swarm_coordinator::machine::{
    CheckpointReport, Command, Config, Coordinator, Event, FAILURE_GRACE_MS, Reply, StepReport,
};
use swarm_sharding::{Bundle, ContentFile, Inputs, JobId, Rank, Recipe, ShardFile, Step, WorkerId};

fn recipe(steps: u64, gb: usize) -> Recipe {
    let mut r = Recipe::from_yaml(&format!(
        "name: t\nmodel: {{ preset: tiny }}\ndata: {{ dataset: d }}\ntrain: {{ steps: {steps}, seq_len: 8, global_batch: {gb}, lr: 0.001 }}\ncheckpoint: {{ dir: c, every: 2, keep: 1, replicas: 1 }}\n"
    ))
    .unwrap();
    r.resolve_model(None, 300).unwrap();
    r
}

fn register(c: &mut Coordinator, now: u64, n: usize) -> Vec<WorkerId> {
    (0..n)
        .map(|i| {
            let out = c
                .step(
                    now,
                    Event::Register {
                        name: format!("host{i}"),
                        devices: vec![],
                        data_addr: format!("127.0.0.1:{}", 9000 + i),
                    },
                )
                .unwrap();
            let Reply::Registered { worker, .. } = out.reply else { panic!("{:?}", out.reply) };
            c.step(now, Event::Connected(worker)).unwrap();
            worker
        })
        .collect()
}

fn submit(c: &mut Coordinator, now: u64, steps: u64, nodes: usize) -> (JobId, Vec<Command>) {
    let out = c
        .step(
            now,
            Event::Submit { recipe: Box::new(recipe(steps, 4)), nodes, resume: None, inputs: Box::new(inputs()) },
        )
        .unwrap();
    let Reply::Submitted(job) = out.reply else { panic!() };
    (job, out.commands)
}

fn inputs() -> Inputs {
    let file = ContentFile { name: "tokens.bin".into(), sha256: "cd".repeat(32), bytes: 8 };
    Inputs { dataset: Bundle { files: vec![file] }, model: None, sources: vec!["10.0.0.9:7452".into()] }
}

fn assigns(cmds: &[Command]) -> Vec<(WorkerId, Rank, usize, usize)> {
    cmds.iter()
        .filter_map(|c| match c {
            Command::Assign { worker, assignment } => {
                Some((*worker, assignment.rank, assignment.share.offset, assignment.share.count))
            }
            _ => None,
        })
        .collect()
}

fn ckpt(job: JobId, w: WorkerId, r: u32, step: u64) -> Event {
    Event::CheckpointWritten(Box::new(CheckpointReport {
        attempt: 1,
        job,
        worker: w,
        rank: Rank(r),
        step: Step(step),
        dir: format!("c/step-{step:06}"),
        files: vec![ShardFile { path: format!("optim-rank{r}.safetensors"), sha256: "ab".into(), bytes: 1 }],
        rng_state: "seed=1".into(),
        data_cursor: step * 4,
        replicas: Vec::new(),
    }))
}

#[test]
fn job_waits_for_workers_then_runs_to_success() {
    let mut c = Coordinator::new(Config::default());
    let ws = register(&mut c, 0, 1);
    let (job, cmds) = submit(&mut c, 10, 2, 2);
    assert!(assigns(&cmds).is_empty(), "must wait for the second worker");
    assert_eq!(c.job(job).unwrap().state, JobState::Waiting);

    let ws2 = register(&mut c, 20, 1);
    let ws = [ws[0], ws2[0]];
    // The second worker's Connected event started the job.
    let running = c.job(job).unwrap();
    assert_eq!(running.state, JobState::Running);
    assert_eq!(running.workers, ws);

    for step in 1..=2u64 {
        for (r, w) in ws.iter().enumerate() {
            let out = c
                .step(
                    100 * step,
                    Event::StepDone(StepReport {
                        attempt: 1,
                        job,
                        worker: *w,
                        rank: Rank(r as u32),
                        step: Step(step),
                        loss: 2.0 + r as f64,
                        tokens: 16,
                        peak_memory_bytes: 1000 + r as u64,
                        bytes_sent: 10 + r as u64,
                        compute_s: 1.0,
                        idle_s: 0.25,
                    }),
                )
                .unwrap();
            assert_eq!(out.reply, Reply::Ack { cancel: None });
        }
        assert_eq!(c.job(job).unwrap().step, Step(step));
        assert_eq!(c.job(job).unwrap().loss, Some(2.5), "token-weighted mean of 2 and 3");
        assert_eq!(c.job(job).unwrap().bytes_sent, 21 * step, "bytes of every rank and step, summed");
        let j = c.job(job).unwrap();
        assert_eq!((j.compute_s.clone(), j.idle_s.clone()), (vec![step as f64; 2], vec![0.25 * step as f64; 2]));
    }
    let out = c.step(300, ckpt(job, ws[0], 0, 2)).unwrap();
    assert!(
        !out.commands.iter().any(|c| matches!(c, Command::CommitCheckpoint { .. })),
        "one rank is not a checkpoint"
    );
    let out = c.step(301, ckpt(job, ws[1], 1, 2)).unwrap();
    let Some(Command::CommitCheckpoint { dir, manifest }) =
        out.commands.iter().find(|c| matches!(c, Command::CommitCheckpoint { .. }))
    else {
        panic!("{:?}", out.commands)
    };
    assert_eq!(manifest.ranks.len(), 2);
    assert_eq!(manifest.data_cursor, 8);
    for (r, w) in ws.iter().enumerate() {
        c.step(
            302,
            Event::JobResult {
                attempt: 1,
                job,
                worker: *w,
                rank: Rank(r as u32),
                ok: true,
                error: String::new(),
                last_step: Step(2),
            },
        )
        .unwrap();
    }
    assert_eq!(c.job(job).unwrap().state, JobState::Running, "not done before the manifest is committed");
    c.step(303, Event::CheckpointCommitted { job, step: Step(2), dir: dir.clone() }).unwrap();
    assert_eq!(c.job(job).unwrap().state, JobState::Succeeded);
    assert_eq!(c.job(job).unwrap().losses, vec![2.5, 2.5]);
    assert!(c.workers().all(|w| w.job.is_none()));
}

#[test]
fn uneven_batch_is_split_and_reported() {
    let mut c = Coordinator::new(Config::default());
    register(&mut c, 0, 3);
    let (_, cmds) = submit(&mut c, 0, 2, 3);
    let a = assigns(&cmds);
    assert_eq!(a.iter().map(|x| (x.2, x.3)).collect::<Vec<_>>(), vec![(0, 2), (2, 1), (3, 1)]);
}

#[test]
fn lost_worker_fails_the_job_naming_it_and_cancels_the_rest() {
    let cfg = Config { lease_ms: 1000, heartbeat_interval_ms: 100 };
    let mut c = Coordinator::new(cfg);
    let ws = register(&mut c, 0, 2);
    let (job, _) = submit(&mut c, 0, 10, 2);
    c.step(900, Event::Heartbeat(ws[0])).unwrap();
    let out = c.step(1500, Event::Tick).unwrap();
    let j = c.job(job).unwrap();
    assert_eq!(j.state, JobState::Failed);
    let err = j.error.clone().unwrap();
    assert!(err.contains("w2") && err.contains("rank1") && err.contains("host1"), "{err}");
    assert!(out.commands.iter().any(|c| matches!(c, Command::Cancel { worker, .. } if *worker == ws[0])));
    let out = c.step(1600, Event::Heartbeat(ws[1])).unwrap();
    assert_eq!(out.reply, Reply::Heartbeat { known: false });
}

#[test]
fn disconnect_fails_running_job_at_once() {
    let mut c = Coordinator::new(Config::default());
    let ws = register(&mut c, 0, 2);
    let (job, _) = submit(&mut c, 0, 10, 2);
    c.step(5, Event::Disconnected(ws[0])).unwrap();
    assert_eq!(c.job(job).unwrap().state, JobState::Failed);
    assert!(c.job(job).unwrap().error.as_ref().unwrap().contains("w1"));
}

#[test]
fn rank_failure_is_reported_with_its_error() {
    let mut c = Coordinator::new(Config::default());
    let ws = register(&mut c, 0, 2);
    let (job, _) = submit(&mut c, 0, 10, 2);
    c.step(
        5,
        Event::JobResult {
            attempt: 1,
            job,
            worker: ws[1],
            rank: Rank(1),
            ok: false,
            error: "dataset missing".into(),
            last_step: Step(0),
        },
    )
    .unwrap();
    // Held for FAILURE_GRACE_MS in case a lost worker explains it, then reported as it is.
    assert_eq!(c.job(job).unwrap().state, JobState::Running);
    c.step(5 + FAILURE_GRACE_MS, Event::Tick).unwrap();
    let e = c.job(job).unwrap().error.clone().unwrap();
    assert!(e.contains("dataset missing") && e.contains("rank1"), "{e}");
}

/// A peer's socket error that arrives before the coordinator sees the worker die: the lost
/// worker, the cause, is what the job's error names.
#[test]
fn a_lost_worker_is_named_over_its_peers_errors() {
    let mut c = Coordinator::new(Config::default());
    let ws = register(&mut c, 0, 2);
    let (job, _) = submit(&mut c, 0, 10, 2);
    let workers = c.job(job).unwrap().workers.clone();
    let result = |rank: u32| Event::JobResult {
        attempt: 1,
        job,
        worker: workers[rank as usize],
        rank: Rank(rank),
        ok: false,
        error: "receiving from rank1: the connection closed".into(),
        last_step: Step(3),
    };
    c.step(10, result(0)).unwrap();
    c.step(30, Event::Disconnected(workers[1])).unwrap();
    let j = c.job(job).unwrap();
    assert_eq!(j.state, JobState::Failed);
    let e = j.error.clone().unwrap();
    assert!(e.contains("was lost") && e.contains("rank1") && !e.contains("receiving"), "{e}");
    assert!(ws.contains(&workers[1]));
    // A later tick does not overwrite the cause.
    c.step(10 + 2 * FAILURE_GRACE_MS, Event::Tick).unwrap();
    assert_eq!(c.job(job).unwrap().error.clone().unwrap(), e);
}

#[test]
fn reports_from_strangers_are_rejected() {
    let mut c = Coordinator::new(Config::default());
    let ws = register(&mut c, 0, 2);
    let (job, _) = submit(&mut c, 0, 10, 1);
    let other = if c.job(job).unwrap().workers[0] == ws[0] { ws[1] } else { ws[0] };
    let e = c.step(
        1,
        Event::StepDone(StepReport {
            attempt: 1,
            job,
            worker: other,
            rank: Rank(0),
            step: Step(1),
            loss: 1.0,
            tokens: 1,
            peak_memory_bytes: 0,
            bytes_sent: 0,
            compute_s: 0.0,
            idle_s: 0.0,
        }),
    );
    assert!(e.is_err());
}

#[test]
fn non_finite_loss_fails_the_job() {
    let mut c = Coordinator::new(Config::default());
    let ws = register(&mut c, 0, 1);
    let (job, _) = submit(&mut c, 0, 10, 1);
    let out = c
        .step(
            1,
            Event::StepDone(StepReport {
                attempt: 1,
                job,
                worker: ws[0],
                rank: Rank(0),
                step: Step(1),
                loss: f64::NAN,
                tokens: 1,
                peak_memory_bytes: 0,
                bytes_sent: 0,
                compute_s: 0.0,
                idle_s: 0.0,
            }),
        )
        .unwrap();
    assert!(matches!(out.reply, Reply::Ack { cancel: Some(_) }));
    assert_eq!(c.job(job).unwrap().state, JobState::Failed);
}

#[test]
fn a_lost_final_checkpoint_report_fails_the_job_instead_of_hanging() {
    let mut c = Coordinator::new(Config::default());
    let ws = register(&mut c, 0, 2);
    let (job, _) = submit(&mut c, 0, 2, 2);
    c.step(1, ckpt(job, ws[0], 0, 2)).unwrap(); // rank1's report never arrives
    for (r, w) in ws.iter().enumerate() {
        c.step(
            2,
            Event::JobResult {
                attempt: 1,
                job,
                worker: *w,
                rank: Rank(r as u32),
                ok: true,
                error: String::new(),
                last_step: Step(2),
            },
        )
        .unwrap();
    }
    let j = c.job(job).unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert!(j.error.as_ref().unwrap().contains("never reported by rank1"), "{:?}", j.error);
}

#[test]
fn workers_of_a_failed_job_stay_busy_until_they_report_stopping() {
    let mut c = Coordinator::new(Config::default());
    let ws = register(&mut c, 0, 2);
    let (job, _) = submit(&mut c, 0, 10, 2);
    c.step(1, Event::Cancel { job, reason: "user".into() }).unwrap();
    // A second job must not be handed to workers that have not stopped yet.
    let (job2, cmds) = submit(&mut c, 2, 10, 2);
    assert!(assigns(&cmds).is_empty());
    c.step(
        3,
        Event::JobResult {
            attempt: 1,
            job,
            worker: ws[0],
            rank: Rank(0),
            ok: false,
            error: "cancelled".into(),
            last_step: Step(0),
        },
    )
    .unwrap();
    let out = c
        .step(
            4,
            Event::JobResult {
                attempt: 1,
                job,
                worker: ws[1],
                rank: Rank(1),
                ok: false,
                error: "cancelled".into(),
                last_step: Step(0),
            },
        )
        .unwrap();
    assert_eq!(assigns(&out.commands).len(), 2);
    assert_eq!(c.job(job2).unwrap().state, JobState::Running);
    assert_eq!(c.job(job).unwrap().state, JobState::Cancelled);
}

#[test]
fn old_checkpoints_are_pruned_to_keep() {
    let mut c = Coordinator::new(Config::default());
    let ws = register(&mut c, 0, 1);
    let (job, _) = submit(&mut c, 0, 10, 1);
    let mut pruned = vec![];
    for step in [2u64, 4] {
        let out = c.step(step, ckpt(job, ws[0], 0, step)).unwrap();
        assert!(out.commands.iter().any(|c| matches!(c, Command::CommitCheckpoint { .. })));
        let out = c
            .step(step, Event::CheckpointCommitted { job, step: Step(step), dir: format!("c/step-{step:06}") })
            .unwrap();
        for cmd in out.commands {
            if let Command::PruneCheckpoints { dirs, .. } = cmd {
                pruned.extend(dirs);
            }
        }
    }
    assert_eq!(pruned, vec!["c/step-000002".to_string()]);
    assert_eq!(c.job(job).unwrap().last_checkpoint().unwrap().step, Step(4));
}

#[test]
fn recovery_interrupts_unfinished_jobs() {
    let mut c = Coordinator::new(Config::default());
    register(&mut c, 0, 1);
    let (job, _) = submit(&mut c, 0, 10, 1);
    let jobs: Vec<_> = c.jobs().cloned().collect();
    let (c2, cmds) = Coordinator::recover(Config::default(), jobs);
    assert_eq!(c2.job(job).unwrap().state, JobState::Interrupted);
    assert!(c2.job(job).unwrap().error.as_ref().unwrap().contains("--resume"));
    assert!(cmds.contains(&Command::SaveJob(job)));
}

#[test]
fn resume_past_the_end_is_refused() {
    let mut c = Coordinator::new(Config::default());
    let e = c
        .step(
            0,
            Event::Submit {
                recipe: Box::new(recipe(10, 4)),
                nodes: 1,
                resume: Some(swarm_sharding::ResumePoint { dir: "x".into(), step: Step(10) }),
                inputs: Box::new(inputs()),
            },
        )
        .err()
        .unwrap();
    assert!(e.to_string().contains("raise train.steps"), "{e}");
}

/// `parallel.workers` places ranks by worker name, and the job waits until those are idle.
#[test]
fn a_named_placement_puts_each_rank_on_its_worker() {
    let mut c = Coordinator::new(Config::default());
    let ws = register(&mut c, 0, 3); // host0, host1, host2
    let mut r = recipe(10, 4);
    r.parallel.workers = Some(vec!["host2".into(), "host0".into()]);
    // Another job holds host0 first: the placed job waits for it.
    let (busy, _) = submit(&mut c, 0, 10, 2);
    let holders = c.job(busy).unwrap().workers.clone();
    assert!(holders.contains(&ws[0]) && holders.contains(&ws[1]), "{holders:?}");
    let out =
        c.step(1, Event::Submit { recipe: Box::new(r), nodes: 2, resume: None, inputs: Box::new(inputs()) }).unwrap();
    let Reply::Submitted(job) = out.reply else { panic!() };
    assert_eq!(c.job(job).unwrap().state, JobState::Waiting);
    c.step(2, Event::Cancel { job: busy, reason: "test".into() }).unwrap();
    for (rank, w) in holders.iter().enumerate() {
        c.step(
            3,
            Event::JobResult {
                attempt: 1,
                job: busy,
                worker: *w,
                rank: Rank(rank as u32),
                ok: true,
                error: String::new(),
                last_step: Step(0),
            },
        )
        .unwrap();
    }
    assert_eq!(c.job(job).unwrap().state, JobState::Running);
    assert_eq!(c.job(job).unwrap().workers, vec![ws[2], ws[0]], "rank 0 on host2, rank 1 on host0");
}

fn report(job: JobId, worker: WorkerId, step: u64) -> StepReport {
    StepReport {
        attempt: 1,
        job,
        worker,
        rank: Rank(0),
        step: Step(step),
        loss: 1.0,
        tokens: 8,
        peak_memory_bytes: 0,
        bytes_sent: 0,
        compute_s: 0.1,
        idle_s: 0.0,
    }
}

/// Every number of a report is checked before it sizes or indexes anything: a step before the
/// job's start (once an underflow that panicked under the service's lock), past its end or far
/// ahead of the other ranks, an old attempt, impossible token counts and times. Each is refused
/// and the job keeps running; an honest report afterwards is taken.
#[test]
fn reports_outside_the_job_are_refused_and_leave_it_running() {
    let mut c = Coordinator::new(Config::default());
    let ws = register(&mut c, 0, 2);
    let resume = swarm_sharding::ResumePoint { dir: "c/step-000004".into(), step: Step(4) };
    let out = c
        .step(
            0,
            Event::Submit {
                recipe: Box::new(recipe(3000, 4)),
                nodes: 1,
                resume: Some(resume),
                inputs: Box::new(inputs()),
            },
        )
        .unwrap();
    let Reply::Submitted(job) = out.reply else { panic!() };
    let w = c.job(job).unwrap().workers[0];
    let bad = [
        (report(job, w, 0), "after step4"),
        (report(job, w, 4), "after step4"),
        (report(job, w, 3001), "at most"),
        (report(job, w, 4 + 1025), "at most step1028"),
        (StepReport { attempt: 0, ..report(job, w, 5) }, "attempt 0"),
        (StepReport { attempt: 2, ..report(job, w, 5) }, "attempt 2"),
        (StepReport { tokens: 33, ..report(job, w, 5) }, "33 tokens"),
        (StepReport { compute_s: -1.0, ..report(job, w, 5) }, "compute -1"),
        (StepReport { idle_s: f64::INFINITY, ..report(job, w, 5) }, "idle inf"),
    ];
    for (r, why) in bad {
        let e = c.step(1, Event::StepDone(r.clone())).err().unwrap_or_else(|| panic!("{r:?} was taken"));
        assert!(e.to_string().contains(why), "{e} (expected {why:?})");
        assert_eq!(c.job(job).unwrap().state, JobState::Running, "{e}");
    }
    let mut ck = match ckpt(job, w, 0, 2) {
        Event::CheckpointWritten(r) => r,
        _ => unreachable!(),
    };
    assert!(c.step(1, Event::CheckpointWritten(ck.clone())).is_err(), "a checkpoint before the start");
    ck.step = Step(6);
    ck.attempt = 7;
    assert!(c.step(1, Event::CheckpointWritten(ck)).is_err(), "a checkpoint of another attempt");
    let result = |attempt, last_step| Event::JobResult {
        attempt,
        job,
        worker: w,
        rank: Rank(0),
        ok: false,
        error: "forged".into(),
        last_step: Step(last_step),
    };
    assert!(c.step(1, result(3, 5)).is_err(), "a result of another attempt");
    assert!(c.step(1, result(1, 3001)).is_err(), "a result past the last step");
    let other = ws.iter().copied().find(|x| *x != w).unwrap();
    assert!(c.step(1, Event::StepDone(report(job, other, 5))).is_err(), "a worker not in the job");
    assert_eq!(c.job(job).unwrap().state, JobState::Running);

    let out = c.step(2, Event::StepDone(report(job, w, 5))).unwrap();
    assert_eq!(out.reply, Reply::Ack { cancel: None });
    let j = c.job(job).unwrap();
    assert_eq!((j.step, j.losses.clone()), (Step(5), vec![1.0]));
}

/// Each rank's files are committed with the hosts that hold them: the writer and the worker
/// that reported a copy. A copy that differs, or too few copies, fails the job; nothing is
/// committed. Assignments list the submitter and then the job's workers as content sources.
#[test]
fn checkpoints_commit_with_their_replicas_and_a_bad_copy_fails_the_job() {
    let replicated = |steps| {
        let mut r = recipe(steps, 6);
        r.checkpoint.replicas = None; // the default: 2 with 2+ workers
        r
    };
    let own = |r: u32| vec![ShardFile { path: format!("optim-rank{r}.safetensors"), sha256: "ab".into(), bytes: 1 }];
    let report = |job, w, r: u32, of: Option<(u32, Vec<ShardFile>)>| {
        let Event::CheckpointWritten(mut c) = ckpt(job, w, r, 2) else { unreachable!() };
        c.replicas = of.into_iter().map(|(o, f)| (Rank(o), f)).collect();
        Event::CheckpointWritten(c)
    };
    for case in ["good", "differs", "missing"] {
        let mut c = Coordinator::new(Config::default());
        let ws = register(&mut c, 0, 3);
        let out = c
            .step(
                1,
                Event::Submit { recipe: Box::new(replicated(4)), nodes: 3, resume: None, inputs: Box::new(inputs()) },
            )
            .unwrap();
        let Reply::Submitted(job) = out.reply else { panic!() };
        let Some(Command::Assign { assignment, .. }) =
            out.commands.iter().find(|c| matches!(c, Command::Assign { .. }))
        else {
            panic!("{:?}", out.commands)
        };
        assert_eq!(
            assignment.inputs.sources,
            ["10.0.0.9:7452", "127.0.0.1:9000", "127.0.0.1:9001", "127.0.0.1:9002"],
            "the submitter first, then the job's workers"
        );
        let mut cmds = Vec::new();
        for r in 0..3u32 {
            let of = (r + 1) % 3;
            let copy = match (case, r) {
                ("differs", 2) => Some((of, vec![ShardFile { sha256: "ff".into(), ..own(of)[0].clone() }])),
                ("missing", 1) => None,
                _ => Some((of, own(of))),
            };
            cmds.extend(c.step(10, report(job, ws[r as usize], r, copy)).unwrap().commands);
        }
        let commit = cmds.iter().find_map(|c| match c {
            Command::CommitCheckpoint { manifest, .. } => Some(manifest),
            _ => None,
        });
        let j = c.job(job).unwrap();
        match case {
            "good" => {
                let m = commit.expect("committed");
                let holders: Vec<Vec<&str>> =
                    m.ranks.iter().map(|r| r.holders.iter().map(|h| h.worker.as_str()).collect()).collect();
                assert_eq!(holders, [["host0", "host2"], ["host1", "host0"], ["host2", "host1"]]);
                assert_eq!(m.ranks[0].holders[1].data_addr, "127.0.0.1:9002");
                assert_eq!(j.state, JobState::Running);
            }
            "differs" => {
                assert!(commit.is_none());
                assert_eq!(j.state, JobState::Failed);
                let e = j.error.as_deref().unwrap();
                assert!(e.contains("the copy of rank0's files on host2 differs"), "{e}");
            }
            _ => {
                assert!(commit.is_none());
                assert_eq!(j.state, JobState::Failed);
                let e = j.error.as_deref().unwrap();
                assert!(e.contains("rank2's files are on 1 host(s), checkpoint.replicas asks for 2"), "{e}");
            }
        }
    }
}

/// A job on fewer workers than `checkpoint.replicas`: the commit sends each rank's files to
/// workers outside the job (idle ones first), and their copies become holders. Asking for more
/// hosts than the cluster has fails the job when it would start.
#[test]
fn small_jobs_replicate_outside_themselves_and_too_many_replicas_are_refused() {
    let mut c = Coordinator::new(Config::default());
    let ws = register(&mut c, 0, 3);
    let mut r = recipe(4, 4);
    r.checkpoint.replicas = None;
    let out = c
        .step(1, Event::Submit { recipe: Box::new(r.clone()), nodes: 1, resume: None, inputs: Box::new(inputs()) })
        .unwrap();
    let Reply::Submitted(job) = out.reply else { panic!() };
    let out = c.step(2, ckpt(job, ws[0], 0, 2)).unwrap();
    let copies: Vec<(WorkerId, Vec<String>)> = out
        .commands
        .iter()
        .filter_map(|c| match c {
            Command::Replicate { worker, sources, .. } => Some((*worker, sources.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(copies, [(ws[1], vec!["127.0.0.1:9000".to_string()])], "one more host, from the writer");
    let Some(Command::CommitCheckpoint { dir, .. }) =
        out.commands.iter().find(|c| matches!(c, Command::CommitCheckpoint { .. }))
    else {
        panic!("{:?}", out.commands)
    };
    c.step(3, Event::CheckpointCommitted { job, step: Step(2), dir: dir.clone() }).unwrap();
    let stored =
        |ok| Event::ReplicaStored { job, step: Step(2), rank: Rank(0), worker: ws[1], ok, error: "disk full".into() };
    let out = c.step(4, stored(true)).unwrap();
    let Some(Command::AddHolder { rank, holder, .. }) = out.commands.first() else { panic!("{:?}", out.commands) };
    assert_eq!((*rank, holder.worker.as_str(), holder.dir.as_str()), (Rank(0), "host1", "checkpoints/t/step-000002"));
    assert!(c.step(5, stored(false)).err().unwrap().to_string().contains("disk full"));

    r.checkpoint.replicas = Some(4);
    r.name = "t2".into();
    let out =
        c.step(6, Event::Submit { recipe: Box::new(r), nodes: 1, resume: None, inputs: Box::new(inputs()) }).unwrap();
    let Reply::Submitted(job2) = out.reply else { panic!() };
    let j = c.job(job2).unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert!(j.error.as_deref().unwrap().contains("checkpoint.replicas = 4"), "{:?}", j.error);
}

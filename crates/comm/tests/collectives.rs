//! Collectives between ranks on this machine: results against a sequential reference, bitwise
//! agreement across ranks and runs, bad configurations, and failures that must not hang.

use comm::{CommError, GroupConfig, ProcessGroup};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn config(rank: usize, world: usize, port: u16, timeout_ms: u64) -> GroupConfig {
    GroupConfig {
        rank,
        world_size: world,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        timeout: Duration::from_millis(timeout_ms),
        shm: true,
        // Every group here authenticates, as one an agent launches does.
        secret: Some(SECRET.into()),
    }
}

const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Runs `f(group)` on `world` ranks, one thread each, and returns their results in rank order.
fn on_ranks<T: Send>(world: usize, f: impl Fn(ProcessGroup) -> T + Sync) -> Vec<T> {
    let port = free_port();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let f = &f;
                s.spawn(
                    move || f(ProcessGroup::connect(&config(r, world, port, 10_000)).expect("rendezvous")),
                )
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn rank_data(rank: usize, len: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * 7919 + rank * 104_729) % 1000) as f32 * 1e-3 - 0.5 + rank as f32 * 0.1).collect()
}

#[test]
fn all_reduce_matches_a_sequential_sum_bitwise_on_every_rank() {
    for world in [1, 2, 3, 4] {
        // Lengths that do and do not divide by the world size, and one shorter than it.
        for len in [1usize, 2, 1000, 300_001] {
            let results = on_ranks(world, |pg| {
                let mut buf = rank_data(pg.rank(), len);
                pg.all_reduce_sum(&mut buf).unwrap();
                buf
            });
            let inputs: Vec<Vec<f32>> = (0..world).map(|r| rank_data(r, len)).collect();
            let want: Vec<f32> =
                (0..len).map(|i| inputs.iter().map(|x| x[i] as f64).sum::<f64>() as f32).collect();
            for (r, got) in results.iter().enumerate() {
                assert_eq!(got.len(), len);
                for (a, b) in got.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                        "world {world} len {len} rank {r}: {a} vs {b}"
                    );
                }
                let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(got), bits(&results[0]), "ranks disagree bitwise (world {world}, len {len})");
            }
        }
    }
}

#[test]
fn every_transport_mix_sums_alike_and_reproducibly() {
    // Ranks 0 and 2 offer shared memory, rank 1 declines: the ring mixes both kinds of link.
    let run = |shm_for: fn(usize) -> bool| {
        let port = free_port();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|r| {
                    s.spawn(move || {
                        let cfg = GroupConfig { shm: shm_for(r), ..config(r, 3, port, 10_000) };
                        let pg = ProcessGroup::connect(&cfg).unwrap();
                        let mut buf = rank_data(r, 3_000_001);
                        pg.all_reduce_sum(&mut buf).unwrap();
                        buf.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        })
    };
    let tcp = run(|_| false);
    let mixed = run(|r| r != 1);
    assert_eq!(tcp, mixed, "a ring mixing TCP and shared-memory links must sum exactly like TCP");
    // All links shared memory: the fused schedule sums in its own fixed order. Reproducible to
    // the bit, and equal to the TCP result to within rounding.
    let shm = run(|_| true);
    assert_eq!(shm, run(|_| true), "the fused schedule is not reproducible");
    for (a, b) in shm[0].iter().zip(&tcp[0]) {
        let (a, b) = (f32::from_bits(*a), f32::from_bits(*b));
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "fused {a} vs hop-by-hop {b}");
    }
}

#[test]
fn all_reduce_is_bitwise_reproducible_across_runs() {
    let run = || {
        on_ranks(4, |pg| {
            let mut buf = rank_data(pg.rank(), 10_007);
            pg.all_reduce_sum(&mut buf).unwrap();
            buf.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        })
    };
    assert_eq!(run(), run());
}

#[test]
fn reduce_scatter_then_all_gather_and_broadcast() {
    let len = 1003;
    let results = on_ranks(3, |pg| {
        let mut buf = rank_data(pg.rank(), len);
        pg.reduce_scatter_sum(&mut buf).unwrap();
        let own = comm::segment(len, 3, pg.rank());
        let mut gathered = vec![0f32; len];
        gathered[own.clone()].copy_from_slice(&buf[own]);
        pg.all_gather(&mut gathered).unwrap();
        let mut b = if pg.rank() == 2 { rank_data(9, 77) } else { vec![0f32; 77] };
        pg.broadcast(&mut b, 2).unwrap();
        pg.barrier().unwrap();
        (gathered, b)
    });
    let mut reduced = rank_data(0, len);
    let pg = on_ranks(3, |pg| {
        let mut buf = rank_data(pg.rank(), len);
        pg.all_reduce_sum(&mut buf).unwrap();
        buf
    });
    reduced.copy_from_slice(&pg[0]);
    for (gathered, b) in &results {
        assert_eq!(gathered, &reduced, "reduce-scatter + all-gather differs from all-reduce");
        assert_eq!(b, &rank_data(9, 77));
    }
}

#[test]
fn mismatched_world_sizes_fail_clearly() {
    let port = free_port();
    let errs: Vec<String> = std::thread::scope(|s| {
        let a = s.spawn(|| ProcessGroup::connect(&config(0, 2, port, 3000)).err().map(|e| e.to_string()));
        let b = s.spawn(|| ProcessGroup::connect(&config(1, 3, port, 3000)).err().map(|e| e.to_string()));
        vec![a.join().unwrap().unwrap(), b.join().unwrap().unwrap()]
    });
    assert!(errs[1].contains("WORLD_SIZE 3 but rank 0 has 2"), "{}", errs[1]);
    assert!(errs[0].contains("rendezvous failed"), "{}", errs[0]);
}

#[test]
fn rank_not_below_world_size_is_refused() {
    let err = ProcessGroup::connect(&config(2, 2, 1, 1000)).err().unwrap().to_string();
    assert!(err.contains("RANK 2 is not below WORLD_SIZE 2"), "{err}");
}

#[test]
fn unreachable_master_fails_within_the_deadline() {
    let port = free_port(); // nothing listens here
    let start = Instant::now();
    let err = ProcessGroup::connect(&config(1, 2, port, 1500)).err().unwrap().to_string();
    let took = start.elapsed();
    assert!(err.contains("could not reach the master store"), "{err}");
    assert!(took < Duration::from_millis(1500 + 1000), "took {took:?}");
}

/// Runs `rank0(group)` as rank 0 of two while rank 1 connects and then never joins a collective
/// (as if stopped) until rank 0 is done.
fn beside_a_silent_peer(rank0_timeout_ms: u64, rank0: impl FnOnce(ProcessGroup)) {
    let port = free_port();
    std::thread::scope(|s| {
        let (done, wait) = std::sync::mpsc::channel::<()>();
        s.spawn(move || {
            let pg = ProcessGroup::connect(&config(1, 2, port, 5000)).unwrap();
            wait.recv_timeout(Duration::from_secs(20)).ok();
            drop(pg);
        });
        rank0(ProcessGroup::connect(&config(0, 2, port, rank0_timeout_ms)).unwrap());
        done.send(()).unwrap();
    });
}

#[test]
fn a_silent_peer_times_out_and_abort_unblocks() {
    beside_a_silent_peer(5000, |mut pg| {
        pg.set_timeout(Duration::from_millis(700));
        let start = Instant::now();
        let err = pg.all_reduce_sum(&mut vec![1.0; 1000]).unwrap_err();
        let took = start.elapsed();
        assert!(matches!(err, CommError::Timeout { peer: 1, .. }), "{err}");
        assert!(took >= Duration::from_millis(650) && took < Duration::from_millis(2000), "took {took:?}");
        // Broken for good, and says why.
        let again = pg.all_reduce_sum(&mut [1.0; 4]).unwrap_err().to_string();
        assert!(again.contains("unusable") && again.contains("rank 1"), "{again}");
    });

    // Abort from another thread ends a collective that would otherwise wait the full deadline.
    beside_a_silent_peer(30_000, |pg| {
        let handle = pg.abort_handle();
        let start = Instant::now();
        let aborter = std::thread::spawn(move || {
            // Whether the abort lands before or during the collective, the result is the same.
            std::thread::sleep(Duration::from_millis(200));
            handle.abort();
        });
        let err = pg.all_reduce_sum(&mut vec![1.0; 1000]).unwrap_err();
        assert!(matches!(err, CommError::Aborted { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5), "abort took {:?}", start.elapsed());
        aborter.join().unwrap();
    });
}

#[test]
fn the_store_and_the_ring_refuse_whoever_lacks_the_attempts_secret() {
    use std::io::{BufRead, BufReader, Write};
    let port = free_port();
    std::thread::scope(|s| {
        let rank0 = s.spawn(move || ProcessGroup::connect(&config(0, 2, port, 3_000)));
        // A stranger reaches the store first: without the secret it is told nothing.
        let stranger = loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(c) => break c,
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let mut reader = BufReader::new(stranger.try_clone().unwrap());
        (&stranger).write_all(b"WAIT world_size 100\n").unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        assert_eq!(reply.trim(), "DENIED");
        // A rank of another attempt (another secret) cannot join: the store refuses it by name.
        let other = GroupConfig { secret: Some("f".repeat(64)), ..config(1, 2, port, 3_000) };
        let err = ProcessGroup::connect(&other).err().expect("refused");
        assert!(err.to_string().contains("MYRIAD_COMM_SECRET"), "{err}");
        // Rank 0 waits for a rank 1 that never comes with the secret, and says so at its deadline.
        let err = rank0.join().unwrap().err().expect("no rank 1");
        assert!(err.to_string().contains("did not join") || err.to_string().contains("deadline"), "{err}");
    });
}

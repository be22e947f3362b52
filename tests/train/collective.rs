//! The parts of the multi-GPU collective that need no GPU: gradient buckets (plan, flatten,
//! split), the choice of backend from the environment, and the TCP control connection's
//! broadcast and dead-peer probe that the NCCL collective relies on.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use mcld::train::dist::bucket;
use mcld::train::dist::collective::Collective;
use mcld::train::dist::rank::{Backend, RankInfo, NCCL_TIMEOUT_S};
use mcld::train::dist::tcp::TcpCollective;

fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |k: &str| {
        pairs
            .iter()
            .find(|(a, _)| *a == k)
            .map(|(_, v)| v.to_string())
    }
}

#[test]
fn bucket_plan_covers_every_tensor_in_order_within_the_bound() {
    let cases: &[(&[usize], usize)] = &[
        (&[], 10),
        (&[3], 10),
        (&[3, 3, 3, 3], 6),
        (&[3, 3, 3, 3], 7),
        (&[11, 2, 2, 11, 1], 10),
        (&[0, 0, 5, 0, 5, 5, 0], 10),
        (&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 15),
        (&[4, 4], 0),
    ];
    for &(sizes, max) in cases {
        let plan = bucket::plan(sizes, max);
        // Every index exactly once, in order, no empty range.
        let flat: Vec<usize> = plan.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(
            flat,
            (0..sizes.len()).collect::<Vec<_>>(),
            "{sizes:?} {max}"
        );
        assert!(plan.iter().all(|r| !r.is_empty()), "{sizes:?} {plan:?}");
        for r in &plan {
            let sum: usize = sizes[r.clone()].iter().sum();
            assert!(
                sum <= max.max(1) || r.len() == 1,
                "{sizes:?} max {max}: bucket {r:?} holds {sum}"
            );
        }
        // Greedy: no two neighbouring buckets would fit into one.
        for w in plan.windows(2) {
            let both: usize = sizes[w[0].start..w[1].end].iter().sum();
            assert!(
                both > max.max(1),
                "{sizes:?} max {max}: {plan:?} could merge"
            );
        }
    }
    assert_eq!(bucket::plan(&[3, 3, 3, 3], 6), vec![0..2, 2..4]);
    assert_eq!(
        bucket::plan(&[11, 2, 2, 11, 1], 10),
        vec![0..1, 1..3, 3..4, 4..5]
    );
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

#[test]
fn split_of_flatten_gives_back_every_tensor() {
    let dev = Device::Cpu;
    let r = |shape: &[usize], seed: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    let wide = r(&[4, 6], 0.5);
    let tensors = vec![
        r(&[3, 4], 0.0),
        r(&[], 1.0),
        r(&[2, 1, 5], 2.0).to_dtype(DType::F16).unwrap(),
        r(&[0, 3], 3.0),
        // Not contiguous, and a view at an offset.
        wide.t().unwrap(),
        wide.narrow(0, 1, 2).unwrap(),
        r(&[7], 4.0).to_dtype(DType::BF16).unwrap(),
    ];
    let flat = bucket::flatten(&tensors).unwrap();
    assert_eq!(flat.dtype(), DType::F32);
    assert_eq!(
        flat.dims(),
        &[tensors.iter().map(|t| t.elem_count()).sum::<usize>()]
    );
    assert!(flat.is_contiguous());
    // Order: the flat buffer is the tensors' row-major values one after another.
    let expected: Vec<u32> = tensors.iter().flat_map(bits).collect();
    assert_eq!(bits(&flat), expected);

    let back = bucket::split(&flat, &tensors).unwrap();
    assert_eq!(back.len(), tensors.len());
    for (a, b) in tensors.iter().zip(&back) {
        assert_eq!(a.dims(), b.dims());
        assert_eq!(a.dtype(), b.dtype());
        assert_eq!(bits(a), bits(b));
    }

    // A sum of flat buffers splits into the sums of the tensors (what the all-reduce does).
    let twice = bucket::split(&(&flat + &flat).unwrap(), &tensors).unwrap();
    for (a, b) in tensors.iter().zip(&twice) {
        assert_eq!(bits(&(a + a).unwrap()), bits(b));
    }

    // Only empty tensors: an empty buffer, and the tensors back.
    let empties = vec![
        Tensor::zeros((0, 3), DType::F16, &dev).unwrap(),
        Tensor::zeros(0, DType::F32, &dev).unwrap(),
    ];
    let none = bucket::flatten(&empties).unwrap();
    assert_eq!(none.dims(), &[0]);
    let back = bucket::split(&none, &empties).unwrap();
    assert_eq!(back[0].dims(), &[0, 3]);
    assert_eq!(back[0].dtype(), DType::F16);

    assert!(bucket::flatten(&[]).is_err());
    let short = flat.narrow(0, 0, flat.elem_count() - 1).unwrap();
    let e = bucket::split(&short, &tensors).unwrap_err().to_string();
    assert!(e.contains("cannot be split"), "{e}");
}

#[test]
fn the_backend_follows_world_device_and_mcld_collective() {
    let nccl = Backend::Nccl {
        timeout: Duration::from_secs(NCCL_TIMEOUT_S),
    };
    let none = env(&[]);
    assert_eq!(
        Backend::from_vars(&none, 1, false).unwrap(),
        Backend::Single
    );
    assert_eq!(Backend::from_vars(&none, 1, true).unwrap(), Backend::Single);
    assert_eq!(Backend::from_vars(&none, 2, false).unwrap(), Backend::Tcp);
    assert_eq!(Backend::from_vars(&none, 2, true).unwrap(), nccl);

    let want_nccl = env(&[("MCLD_COLLECTIVE", "nccl"), ("MCLD_NCCL_TIMEOUT", "30")]);
    let short = Backend::Nccl {
        timeout: Duration::from_secs(30),
    };
    assert_eq!(Backend::from_vars(&want_nccl, 1, true).unwrap(), short);
    assert_eq!(Backend::from_vars(&want_nccl, 4, true).unwrap(), short);
    let e = Backend::from_vars(&want_nccl, 2, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs a CUDA device"), "{e}");

    let want_tcp = env(&[("MCLD_COLLECTIVE", "TCP")]);
    assert_eq!(
        Backend::from_vars(&want_tcp, 2, true).unwrap(),
        Backend::Tcp
    );
    assert_eq!(
        Backend::from_vars(&want_tcp, 1, true).unwrap(),
        Backend::Single
    );
    assert_eq!(
        Backend::from_vars(env(&[("MCLD_COLLECTIVE", "auto")]), 2, true).unwrap(),
        nccl
    );

    let e = Backend::from_vars(env(&[("MCLD_COLLECTIVE", "gloo")]), 2, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("MCLD_COLLECTIVE=\"gloo\""), "{e}");
    for bad in [
        &[("MCLD_NCCL_TIMEOUT", "0")][..],
        &[("MCLD_NCCL_TIMEOUT", "soon")],
    ] {
        let pairs: Vec<(String, String)> = bad
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let get = move |k: &str| pairs.iter().find(|(a, _)| a == k).map(|(_, v)| v.clone());
        let e = Backend::from_vars(get, 2, true).unwrap_err().to_string();
        assert!(e.contains("MCLD_NCCL_TIMEOUT"), "{e}");
    }
}

#[test]
fn under_torchrun_the_rendezvous_takes_the_port_after_its_store() {
    let plain = RankInfo::from_vars(env(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
    ]))
    .unwrap();
    assert_eq!(plain.master_port, Some(29500));
    let torchrun = RankInfo::from_vars(env(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
    ]))
    .unwrap();
    assert_eq!(torchrun.master_port, Some(29501));
    let not_shared = RankInfo::from_vars(env(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_USE_AGENT_STORE", "False"),
    ]))
    .unwrap();
    assert_eq!(not_shared.master_port, Some(29500));
    let e = RankInfo::from_vars(env(&[
        ("WORLD_SIZE", "2"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "65535"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
    ]))
    .unwrap_err()
    .to_string();
    assert!(e.contains("MASTER_PORT=65535"), "{e}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn info(rank: usize, world: usize, port: u16) -> RankInfo {
    RankInfo {
        rank,
        world,
        local_rank: rank,
        master_addr: Some("127.0.0.1".into()),
        master_port: Some(port),
    }
}

#[test]
fn tcp_control_broadcasts_from_rank_0_and_notices_a_closed_peer() {
    let port = free_port();
    let world = 3;
    let mut leave = Vec::new();
    let ranks: Vec<_> = (1..world)
        .map(|r| {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            leave.push(tx);
            std::thread::spawn(move || {
                let c =
                    TcpCollective::connect(&info(r, world, port), Duration::from_secs(30)).unwrap();
                let got = c.broadcast_from_root(b"ignored").unwrap();
                c.check_peers().unwrap();
                // Stays connected until told to leave.
                rx.recv().unwrap();
                got
            })
        })
        .collect();
    let root = TcpCollective::connect(&info(0, world, port), Duration::from_secs(30)).unwrap();
    let id: Vec<u8> = (0..128u8).collect();
    assert_eq!(root.broadcast_from_root(&id).unwrap(), id);
    root.check_peers().unwrap();

    // Rank 2 leaves (its connection closes); rank 1 stays: the probe names rank 2, at once.
    let mut ranks = ranks.into_iter();
    let (r1, r2) = (ranks.next().unwrap(), ranks.next().unwrap());
    leave[1].send(()).unwrap();
    assert_eq!(r2.join().unwrap(), id);
    let t0 = Instant::now();
    let e = loop {
        match root.check_peers() {
            Err(e) => break e.to_string(),
            Ok(()) if t0.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Ok(()) => panic!("rank 2 left, and the probe still sees it"),
        }
    };
    assert!(e.contains("lost rank 2"), "{e}");
    leave[0].send(()).unwrap();
    assert_eq!(r1.join().unwrap(), id);
}

#[test]
fn tcp_probe_leaves_pending_data_for_the_next_exchange() {
    let port = free_port();
    let peer = std::thread::spawn(move || {
        let c = TcpCollective::connect(&info(1, 2, port), Duration::from_secs(30)).unwrap();
        // Sends first, so rank 0 finds data waiting when it probes.
        c.all_gather_f64(&[2.5]).unwrap()
    });
    let root = TcpCollective::connect(&info(0, 2, port), Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    root.check_peers().unwrap();
    root.check_peers().unwrap();
    let all = root.all_gather_f64(&[1.0]).unwrap();
    assert_eq!(all, vec![vec![1.0], vec![2.5]]);
    assert_eq!(peer.join().unwrap(), all);
}

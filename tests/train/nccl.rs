//! The NCCL collective on real GPUs (`cuda,nccl` build only; `#[ignore]`d since they need
//! GPUs, and failing when run where there are too few). One GPU: a rank alone reduces many tensors through several
//! buckets and gets them back bit for bit. Two GPUs: two ranks (threads, one GPU each, TCP
//! rendezvous on localhost) get the exact sums, and a rank that leaves stops the other with an
//! error. Run by scripts/gpu-check-nccl.sh.

use std::time::Duration;

use candle_core::cuda_backend::cudarc::driver::CudaContext;
use candle_core::{DType, Device, Tensor};
use mcld::train::dist::collective::Collective;
use mcld::train::dist::nccl::NcclCollective;
use mcld::train::dist::rank::RankInfo;

fn gpus() -> usize {
    CudaContext::device_count().map(|n| n as usize).unwrap_or(0)
}

/// Tensors of several shapes and dtypes, values depending on `seed`: 40 KiB of f32 in all, more
/// than one 4 KiB bucket, with one tensor larger than a bucket.
fn grads(dev: &Device, seed: f32) -> Vec<Tensor> {
    let shapes: &[&[usize]] = &[
        &[3, 4],
        &[],
        &[2000],
        &[17, 5],
        &[64],
        &[0],
        &[8, 8, 8],
        &[1],
    ];
    let mut out: Vec<Tensor> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|k| ((k as f32 + 1.0) * 0.731 + seed + i as f32).sin() * 3.0)
                .collect();
            Tensor::from_vec(v, *s, dev).unwrap()
        })
        .collect();
    out[4] = out[4].to_dtype(DType::F16).unwrap();
    out[6] = out[6].to_dtype(DType::BF16).unwrap();
    out
}

fn host_bits(t: &Tensor) -> Vec<u32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

const LIMIT: Duration = Duration::from_secs(60);

#[test]
#[ignore = "needs a GPU (scripts/gpu-check-nccl.sh runs it with --ignored)"]
fn nccl_alone_gives_back_every_tensor_through_several_buckets() {
    assert!(gpus() >= 1, "nccl: this test needs a GPU, none is visible");
    let dev = Device::new_cuda(0).unwrap();
    let coll = NcclCollective::connect(&RankInfo::single(), &dev, LIMIT, LIMIT)
        .unwrap()
        .with_bucket_bytes(4096);
    let g = grads(&dev, 0.0);
    let out = coll.all_reduce_sum(&g).unwrap();
    assert_eq!(out.len(), g.len());
    for (a, b) in g.iter().zip(&out) {
        assert_eq!(a.dims(), b.dims());
        assert_eq!(a.dtype(), b.dtype());
        assert!(b.device().is_cuda());
        assert_eq!(host_bits(a), host_bits(b));
    }
    // Twice in a row, and with the default bucket size.
    let again = coll.all_reduce_sum(&out).unwrap();
    assert_eq!(host_bits(&again[2]), host_bits(&g[2]));
    assert_eq!(
        coll.all_gather_f64(&[1.5, 2.0]).unwrap(),
        vec![vec![1.5, 2.0]]
    );
    assert!(coll.all_reduce_sum(&[]).unwrap().is_empty());
    println!(
        "nccl: one rank, {} tensors through 4 KiB buckets: ok",
        g.len()
    );
}

fn two_ranks<T: Send + 'static>(
    f: impl Fn(usize, NcclCollective, Device) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let handles: Vec<_> = (0..2)
        .map(|r| {
            let f = f.clone();
            std::thread::spawn(move || {
                let info = RankInfo {
                    rank: r,
                    world: 2,
                    local_rank: r,
                    master_addr: Some("127.0.0.1".into()),
                    master_port: Some(port),
                };
                let dev = Device::new_cuda(r).unwrap();
                let coll = NcclCollective::connect(&info, &dev, LIMIT, LIMIT).unwrap();
                f(r, coll.with_bucket_bytes(4096), dev)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
#[ignore = "needs 2 GPUs (scripts/gpu-check-nccl.sh runs it with --ignored on 2+)"]
fn nccl_two_ranks_get_the_exact_sums_and_a_leaving_rank_stops_the_other() {
    assert!(
        gpus() >= 2,
        "nccl: the two-rank test needs 2 GPUs, {} visible",
        gpus()
    );
    let sums = two_ranks(|r, coll, dev| {
        let out = coll.all_reduce_sum(&grads(&dev, r as f32)).unwrap();
        let gathered = coll.all_gather_f64(&[r as f64]).unwrap();
        assert_eq!(gathered, vec![vec![0.0], vec![1.0]]);
        out.iter().map(host_bits).collect::<Vec<_>>()
    });
    assert_eq!(sums[0], sums[1], "the ranks got different sums");
    let (a, b) = (grads(&Device::Cpu, 0.0), grads(&Device::Cpu, 1.0));
    for ((x, y), got) in a.iter().zip(&b).zip(&sums[0]) {
        // One addition per element, in f32, rounded back to the tensor's dtype.
        let want = (x.to_dtype(DType::F32).unwrap() + y.to_dtype(DType::F32).unwrap())
            .unwrap()
            .to_dtype(x.dtype())
            .unwrap();
        assert_eq!(&host_bits(&want), got);
    }

    // Rank 1 leaves right after joining; rank 0's next reduction is an error, not a hang.
    let t0 = std::time::Instant::now();
    let errs = two_ranks(|r, coll, dev| {
        if r == 1 {
            drop(coll);
            return String::new();
        }
        coll.all_reduce_sum(&grads(&dev, 0.0))
            .unwrap_err()
            .to_string()
    });
    assert!(errs[0].contains("lost rank 1"), "{}", errs[0]);
    assert!(t0.elapsed() < LIMIT);
    println!("nccl: two ranks on two GPUs: exact sums; a leaving rank is an error: ok");
}

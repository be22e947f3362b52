//! One UNet block as a recomputed segment (see `ops::recompute`): its inputs are the
//! hidden states, the time embedding, the stage context, any skips and the bank entries the
//! block reads; its outputs the block's result, its skips and the bank entries it records.

use std::cell::RefCell;
use std::rc::Rc;

use candle_core::Tensor;

use super::attention::RunCtx;
use super::{BankMode, ReferenceBank};
use crate::ops::recompute::Tape;
use crate::Result;

/// What the first run of a segment learnt about the shape of its outputs.
#[derive(Default)]
struct Meta {
    extra: usize,
    recorded: Vec<String>,
}

/// Runs `call(inputs, run)` as a segment of `tape`. `prefix` (e.g. `"down_blocks.1."`) selects
/// the bank entries the block reads. Returns the block output and its extra outputs (skips).
pub(crate) fn block<'s>(
    tape: &Tape<'s>,
    run: &mut RunCtx,
    prefix: &str,
    inputs: Vec<Tensor>,
    call: impl Fn(&[Tensor], &mut RunCtx) -> Result<(Tensor, Vec<Tensor>)> + 's,
) -> Result<(Tensor, Vec<Tensor>)> {
    let n_in = inputs.len();
    let mut all = inputs;
    let mut names = Vec::new();
    // The closure outlives this call, so it owns the mask rather than borrowing it.
    let mode = run
        .bank
        .as_ref()
        .map(|(_, m)| (m.ignore.to_vec(), m.fp16_round));
    if let Some((bank, _)) = &run.bank {
        for (n, t) in &bank.entries {
            if n.starts_with(prefix) {
                names.push(n.clone());
                all.push(t.clone());
            }
        }
    }
    let recording = run.record.is_some();
    let meta = Rc::new(RefCell::new(Meta::default()));
    let seen = meta.clone();
    let outs = tape.run(all, move |ins: &[Tensor]| {
        let bank = ReferenceBank {
            entries: names
                .iter()
                .cloned()
                .zip(ins[n_in..].iter().cloned())
                .collect(),
        };
        let mut rec = Vec::new();
        let (o, extra) = {
            let mut r = RunCtx {
                record: if recording { Some(&mut rec) } else { None },
                bank: mode.as_ref().map(|(ignore, fp16_round)| {
                    (
                        &bank,
                        BankMode {
                            ignore,
                            fp16_round: *fp16_round,
                        },
                    )
                }),
            };
            call(&ins[..n_in], &mut r)?
        };
        let mut m = seen.borrow_mut();
        m.extra = extra.len();
        m.recorded = rec.iter().map(|(n, _)| n.clone()).collect();
        let mut out = Vec::with_capacity(1 + extra.len() + rec.len());
        out.push(o);
        out.extend(extra);
        out.extend(rec.into_iter().map(|(_, t)| t));
        Ok(out)
    })?;
    let m = meta.borrow();
    let extra = outs[1..1 + m.extra].to_vec();
    if let Some(rec) = run.record.as_deref_mut() {
        rec.extend(
            m.recorded
                .iter()
                .cloned()
                .zip(outs[1 + m.extra..].iter().cloned()),
        );
    }
    Ok((outs[0].clone(), extra))
}

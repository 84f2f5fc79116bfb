//! Which packet worker each Violin lives on, once it has traffic: a loud Violin (one
//! that keeps its worker busy) gets that worker to itself while another worker has no
//! loud Violin, so its neighbours' frames wake a worker that is free to run them at
//! once instead of queueing behind its load. Decided from the time each worker spent
//! on each Violin over a period (its `busy_ns`), passed in; the control thread carries
//! the moves out ([`crate::datapath::worker::Command::Export`]).

use std::collections::BTreeMap;

/// One Violin over the last period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ViolinLoad {
    pub vni: u32,
    pub worker: usize,
    /// Fraction of one core its worker spent on it.
    pub share: f64,
    /// It moved recently: it stays where it is this time.
    pub settled: bool,
}

/// The moves (VNI, to worker) that give each loud Violin (`share >= loud`) a worker of
/// its own, as far as there are workers without one: first a loud Violin that shares
/// its worker with a louder one goes to a worker with no loud Violin, then every other
/// Violin still beside a loud one and not idle (it had frames in the period) goes to
/// the least loaded worker without one. Nothing moves where every worker has a loud
/// Violin, or nothing is loud; an idle Violin stays until it has traffic.
pub fn moves(loads: &[ViolinLoad], workers: usize, loud: f64) -> Vec<(u32, usize)> {
    let is_loud = |l: &ViolinLoad| loud > 0.0 && l.share >= loud;
    let mut at: Vec<usize> = loads.iter().map(|l| l.worker).collect();
    let mut load = vec![0.0f64; workers];
    let mut count = vec![0usize; workers];
    let mut loudest: Vec<Option<usize>> = vec![None; workers];
    for (i, l) in loads.iter().enumerate() {
        if l.worker >= workers {
            return Vec::new();
        }
        load[l.worker] += l.share;
        count[l.worker] += 1;
        if is_loud(l) {
            let w = &mut loudest[l.worker];
            if w.is_none_or(|j| loads[j].share < l.share) {
                *w = Some(i);
            }
        }
    }
    let mut out = BTreeMap::new();
    // The quiet worker with the least load (then the fewest Violins, then the lowest).
    let target = |loudest: &[Option<usize>], load: &[f64], count: &[usize]| {
        (0..workers)
            .filter(|&w| loudest[w].is_none())
            .min_by(|&a, &b| {
                load[a]
                    .total_cmp(&load[b])
                    .then(count[a].cmp(&count[b]))
                    .then(a.cmp(&b))
            })
    };
    let mut go = |i: usize, to: usize, at: &mut [usize], load: &mut [f64], count: &mut [usize]| {
        let from = at[i];
        load[from] -= loads[i].share;
        count[from] -= 1;
        load[to] += loads[i].share;
        count[to] += 1;
        at[i] = to;
        out.insert(loads[i].vni, to);
    };
    // Loud Violins beside a louder one, loudest first.
    let mut extra: Vec<usize> = (0..loads.len())
        .filter(|&i| is_loud(&loads[i]) && loudest[at[i]] != Some(i) && !loads[i].settled)
        .collect();
    extra.sort_by(|&a, &b| loads[b].share.total_cmp(&loads[a].share));
    for i in extra {
        let Some(to) = target(&loudest, &load, &count) else {
            break;
        };
        go(i, to, &mut at, &mut load, &mut count);
        loudest[to] = Some(i);
    }
    // Quiet Violins beside a loud one, busiest first.
    let mut beside: Vec<usize> = (0..loads.len())
        .filter(|&i| {
            let l = &loads[i];
            !is_loud(l) && l.share > 0.0 && loudest[at[i]].is_some() && !l.settled
        })
        .collect();
    beside.sort_by(|&a, &b| loads[b].share.total_cmp(&loads[a].share));
    for i in beside {
        let Some(to) = target(&loudest, &load, &count) else {
            break;
        };
        go(i, to, &mut at, &mut load, &mut count);
    }
    out.into_iter().collect()
}

/// Each Violin's share of a core between two readings of its cumulative `busy_ns`,
/// `ns` apart; a Violin without an earlier reading has none yet.
pub fn shares(
    before: &BTreeMap<u32, u64>,
    now: &BTreeMap<u32, u64>,
    ns: u64,
) -> BTreeMap<u32, f64> {
    now.iter()
        .filter_map(|(vni, &b)| {
            let a = *before.get(vni)?;
            Some((*vni, b.saturating_sub(a) as f64 / ns.max(1) as f64))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(vni: u32, worker: usize, share: f64) -> ViolinLoad {
        ViolinLoad {
            vni,
            worker,
            share,
            settled: false,
        }
    }

    #[test]
    fn a_loud_violins_neighbours_go_to_the_quiet_worker() {
        // The flood (1) shares worker 0 with two quiet Violins; worker 1 has one.
        let loads = [l(1, 0, 0.6), l(2, 0, 0.01), l(3, 0, 0.02), l(4, 1, 0.0)];
        assert_eq!(moves(&loads, 2, 0.2), vec![(2, 1), (3, 1)]);
        // An idle neighbour stays until it has traffic.
        let loads = [l(1, 0, 0.6), l(2, 0, 0.0), l(3, 0, 0.02), l(4, 1, 0.0)];
        assert_eq!(moves(&loads, 2, 0.2), vec![(3, 1)]);
        // Spread over the quiet workers by load.
        let loads = [l(1, 0, 0.6), l(2, 0, 0.05), l(3, 0, 0.02), l(4, 1, 0.04)];
        assert_eq!(moves(&loads, 3, 0.2), vec![(2, 2), (3, 1)]);
        let loads = [l(1, 0, 0.6), l(2, 0, 0.05), l(3, 0, 0.02), l(4, 2, 0.01)];
        assert_eq!(moves(&loads, 3, 0.2), vec![(2, 1), (3, 2)]);
    }

    #[test]
    fn two_loud_violins_on_one_worker_part() {
        let loads = [l(1, 0, 0.5), l(2, 0, 0.4), l(3, 1, 0.01)];
        // The less loud one goes; the quiet one there now has a loud neighbour, and no
        // quiet worker is left: it stays.
        assert_eq!(moves(&loads, 2, 0.2), vec![(2, 1)]);
        let loads = [l(1, 0, 0.5), l(2, 0, 0.4), l(3, 0, 0.01)];
        assert_eq!(moves(&loads, 3, 0.2), vec![(2, 1), (3, 2)]);
    }

    #[test]
    fn nothing_moves_without_a_loud_violin_or_a_quiet_worker() {
        let quiet = [l(1, 0, 0.1), l(2, 0, 0.1), l(3, 1, 0.0)];
        assert!(moves(&quiet, 2, 0.2).is_empty());
        let busy = [l(1, 0, 0.5), l(2, 0, 0.01), l(3, 1, 0.5)];
        assert!(
            moves(&busy, 2, 0.2).is_empty(),
            "every worker has a loud one"
        );
        let idle = [l(1, 0, 0.9), l(2, 0, 0.0), l(3, 1, 0.02)];
        assert!(moves(&idle, 2, 0.2).is_empty(), "the neighbour is idle");
        let alone = [l(1, 0, 0.9), l(2, 1, 0.01), l(3, 1, 0.02)];
        assert!(moves(&alone, 2, 0.2).is_empty(), "already alone");
        let off = [l(1, 0, 0.9), l(2, 0, 0.01)];
        assert!(
            moves(&off, 2, 0.0).is_empty(),
            "a threshold of 0 turns it off"
        );
        assert!(moves(&off, 1, 0.2).is_empty(), "one worker");
    }

    #[test]
    fn a_violin_that_just_moved_stays() {
        let mut loads = [l(1, 0, 0.6), l(2, 0, 0.01), l(3, 1, 0.0)];
        loads[1].settled = true;
        assert!(moves(&loads, 2, 0.2).is_empty());
    }

    #[test]
    fn the_moves_settle() {
        // Applying the moves and deciding again moves nothing.
        let mut loads = vec![
            l(1, 0, 0.6),
            l(2, 0, 0.05),
            l(3, 1, 0.3),
            l(4, 1, 0.02),
            l(5, 2, 0.0),
            l(6, 3, 0.25),
        ];
        for _ in 0..3 {
            for (vni, to) in moves(&loads, 4, 0.2) {
                loads.iter_mut().find(|x| x.vni == vni).unwrap().worker = to;
            }
        }
        assert!(moves(&loads, 4, 0.2).is_empty(), "{loads:?}");
    }

    #[test]
    fn shares_over_a_period() {
        let before = BTreeMap::from([(1, 1_000), (2, 5_000)]);
        let now = BTreeMap::from([(1, 501_000), (2, 5_000), (3, 9_000)]);
        let s = shares(&before, &now, 1_000_000);
        assert_eq!(s, BTreeMap::from([(1, 0.5), (2, 0.0)]));
    }
}

//! Random Cut Forest: a streaming anomaly detector (Guha, Mishra, Roy, Schrijvers, "Robust
//! Random Cut Forest Based Anomaly Detection on Streams", ICML 2016), the algorithm behind
//! Kinesis Data Analytics' `RANDOM_CUT_FOREST`.
//!
//! Each tree keeps a sample of the stream (a reservoir of `sample_size` points chosen with a
//! time-decayed weight, so recent points are favoured) and a random cut tree over it: a cut
//! dimension is chosen with probability proportional to its range in the node's bounding box,
//! the cut uniformly within that range. A point that is easy to separate from the sample (cut
//! off near the root) is anomalous.
//!
//! The score is the one AWS's RCF libraries report: the expected inverse depth at which the
//! point would be cut off, following its path down each tree with, at every node, the
//! probability that a random cut of the node's box extended by the point separates them;
//! multiplied by `log2(1 + sample size)` and averaged over trees, so an inlier scores about 1 and
//! an isolated outlier about `log2(sample size) / 2`. The same walk splits the score over the
//! dimensions by how much the point sticks out in each (attribution).
//!
//! Nothing here allocates per scored point; an update changes a tree only when its sampler
//! accepts the point (about one tree in ten at steady state).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Features per point (see [`crate::model::features`]).
pub const DIMS: usize = 8;

/// One point of the stream.
pub type Point = [f32; DIMS];

const NONE: u32 = u32::MAX;

/// The forest's size and memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForestConfig {
    pub trees: usize,
    pub sample_size: usize,
    /// Weight decay per update: a point `1 / time_decay` updates old weighs `1/e` as much as a
    /// new one when the samplers choose what to keep.
    pub time_decay: f64,
    pub seed: u64,
}

impl ForestConfig {
    /// `trees` trees of `sample_size` points, with the decay AWS's library defaults to
    /// (`1 / (10 × sample_size)`).
    pub fn new(trees: usize, sample_size: usize, seed: u64) -> Self {
        Self {
            trees,
            sample_size,
            time_decay: 1.0 / (10.0 * sample_size.max(1) as f64),
            seed,
        }
    }
}

/// SplitMix64: small, fast, and its whole state is one `u64` (snapshotted with the trees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1): never 0, so `ln` of it is finite.
    pub(crate) fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

#[derive(Debug, Clone)]
struct Node {
    parent: u32,
    /// `NONE` for a leaf.
    left: u32,
    right: u32,
    dim: u32,
    cut: f32,
    /// Points under the node (a leaf counts its duplicates).
    mass: u32,
    /// The bounding box; a leaf's is its point.
    lo: Point,
    hi: Point,
}

impl Node {
    fn is_leaf(&self) -> bool {
        self.left == NONE
    }
}

/// A sample's weight, ordered for the max-heap of what to evict next.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Weighted(f64, u32);

impl Eq for Weighted {}

impl PartialOrd for Weighted {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Weighted {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// One random cut tree and its sampler.
#[derive(Debug, Clone)]
pub(crate) struct Tree {
    nodes: Vec<Node>,
    free: Vec<u32>,
    root: u32,
    /// Sample slot → its point, weight and leaf.
    pub(crate) points: Vec<Point>,
    pub(crate) weights: Vec<f64>,
    leaf_of: Vec<u32>,
    /// The slots by weight, largest (first to go) on top.
    heap: BinaryHeap<Weighted>,
    pub(crate) rng: Rng,
}

impl Tree {
    fn new(sample_size: usize, rng: Rng) -> Self {
        Self {
            nodes: Vec::with_capacity(2 * sample_size),
            free: Vec::new(),
            root: NONE,
            points: Vec::with_capacity(sample_size),
            weights: Vec::with_capacity(sample_size),
            leaf_of: Vec::with_capacity(sample_size),
            heap: BinaryHeap::with_capacity(sample_size + 1),
            rng,
        }
    }

    fn alloc(&mut self, node: Node) -> u32 {
        if let Some(id) = self.free.pop() {
            self.nodes[id as usize] = node;
            id
        } else {
            self.nodes.push(node);
            (self.nodes.len() - 1) as u32
        }
    }

    fn leaf(point: Point, parent: u32) -> Node {
        Node {
            parent,
            left: NONE,
            right: NONE,
            dim: 0,
            cut: 0.0,
            mass: 1,
            lo: point,
            hi: point,
        }
    }

    fn replace_child(&mut self, parent: u32, old: u32, new: u32) {
        if parent == NONE {
            self.root = new;
        } else {
            let p = &mut self.nodes[parent as usize];
            if p.left == old {
                p.left = new;
            } else {
                p.right = new;
            }
        }
        self.nodes[new as usize].parent = parent;
    }

    /// Offer the point to the sampler; insert it (and evict the heaviest) if accepted.
    fn update(&mut self, point: &Point, weight: f64, sample_size: usize) {
        if self.points.len() < sample_size {
            let slot = self.points.len() as u32;
            let leaf = self.insert(point);
            self.points.push(*point);
            self.weights.push(weight);
            self.leaf_of.push(leaf);
            self.heap.push(Weighted(weight, slot));
            return;
        }
        match self.heap.peek() {
            Some(top) if weight < top.0 => {}
            _ => return,
        }
        let Some(Weighted(_, slot)) = self.heap.pop() else {
            return;
        };
        let s = slot as usize;
        self.delete(self.leaf_of[s]);
        let leaf = self.insert(point);
        self.points[s] = *point;
        self.weights[s] = weight;
        self.leaf_of[s] = leaf;
        self.heap.push(Weighted(weight, slot));
    }

    /// Insert a point into the tree (Guha et al., algorithm 3); returns its leaf.
    fn insert(&mut self, p: &Point) -> u32 {
        if self.root == NONE {
            let leaf = self.alloc(Self::leaf(*p, NONE));
            self.root = leaf;
            return leaf;
        }
        let mut v = self.root;
        loop {
            let node = &self.nodes[v as usize];
            let mut lo = node.lo;
            let mut hi = node.hi;
            let mut total = 0.0f64;
            for d in 0..DIMS {
                lo[d] = lo[d].min(p[d]);
                hi[d] = hi[d].max(p[d]);
                total += f64::from(hi[d] - lo[d]);
            }
            if total <= 0.0 {
                // Only a leaf holding this very point has an empty merged box: a duplicate.
                // (Ancestors were counted on the way down.)
                self.nodes[v as usize].mass += 1;
                return v;
            }
            let mut r = self.rng.unit() * total;
            let mut dim = DIMS;
            for d in 0..DIMS {
                let range = f64::from(hi[d] - lo[d]);
                if range > 0.0 {
                    dim = d;
                    if r < range {
                        break;
                    }
                    r -= range;
                }
            }
            // Within the merged box and strictly below its top, so a cut that separates always
            // leaves the point and the box on opposite sides (and a leaf is always separated).
            let cut = ((f64::from(lo[dim]) + r) as f32).clamp(lo[dim], next_below(hi[dim]));
            let separates = (p[dim] < node.lo[dim] && cut < node.lo[dim])
                || (p[dim] > node.hi[dim] && cut >= node.hi[dim]);
            debug_assert!(separates || !node.is_leaf());
            if separates || node.is_leaf() {
                let parent = node.parent;
                let mass = node.mass + 1;
                let leaf = self.alloc(Self::leaf(*p, NONE));
                let (left, right) = if p[dim] <= cut { (leaf, v) } else { (v, leaf) };
                let inner = self.alloc(Node {
                    parent,
                    left,
                    right,
                    dim: dim as u32,
                    cut,
                    mass,
                    lo,
                    hi,
                });
                self.replace_child(parent, v, inner);
                self.nodes[leaf as usize].parent = inner;
                self.nodes[v as usize].parent = inner;
                return leaf;
            }
            // Not cut off here: the point joins this subtree, and goes down the node's own cut.
            let node = &mut self.nodes[v as usize];
            node.mass += 1;
            node.lo = lo;
            node.hi = hi;
            v = if p[node.dim as usize] <= node.cut {
                node.left
            } else {
                node.right
            };
        }
    }

    /// Remove one copy of a leaf's point.
    fn delete(&mut self, leaf: u32) {
        if self.nodes[leaf as usize].mass > 1 {
            let mut v = leaf;
            while v != NONE {
                let node = &mut self.nodes[v as usize];
                node.mass -= 1;
                v = node.parent;
            }
            return;
        }
        let parent = self.nodes[leaf as usize].parent;
        self.free.push(leaf);
        if parent == NONE {
            self.root = NONE;
            return;
        }
        let p = &self.nodes[parent as usize];
        let sibling = if p.left == leaf { p.right } else { p.left };
        let grand = p.parent;
        self.replace_child(grand, parent, sibling);
        self.free.push(parent);
        let mut v = grand;
        while v != NONE {
            let (l, r) = {
                let node = &self.nodes[v as usize];
                (node.left as usize, node.right as usize)
            };
            let mut lo = self.nodes[l].lo;
            let mut hi = self.nodes[l].hi;
            for d in 0..DIMS {
                lo[d] = lo[d].min(self.nodes[r].lo[d]);
                hi[d] = hi[d].max(self.nodes[r].hi[d]);
            }
            let node = &mut self.nodes[v as usize];
            node.mass -= 1;
            node.lo = lo;
            node.hi = hi;
            v = node.parent;
        }
    }

    fn mass(&self) -> u32 {
        if self.root == NONE {
            0
        } else {
            self.nodes[self.root as usize].mass
        }
    }

    /// The tree's score of `q`; with `attribution`, its split over the dimensions is added there.
    fn score(&self, q: &Point, mut attribution: Option<&mut [f64; DIMS]>) -> f64 {
        if self.root == NONE {
            return 0.0;
        }
        let tree_mass = f64::from(self.mass());
        let normalizer = (tree_mass + 1.0).log2();
        let mut v = self.root;
        let mut depth = 0.0f64;
        // Probability that q was not cut off above this node.
        let mut rest = 1.0f64;
        let mut score = 0.0f64;
        loop {
            let node = &self.nodes[v as usize];
            let mut outside = [0.0f64; DIMS];
            let mut ext = 0.0f64;
            let mut range = 0.0f64;
            for d in 0..DIMS {
                let o = f64::from((q[d] - node.hi[d]).max(0.0) + (node.lo[d] - q[d]).max(0.0));
                outside[d] = o;
                ext += o;
                range += f64::from(node.hi[d] - node.lo[d]);
            }
            range += ext;
            if node.is_leaf() {
                if ext == 0.0 {
                    // Seen before: damped by how much of the sample it is.
                    let mass = f64::from(node.mass);
                    let seen = (1.0 - mass / (2.0 * tree_mass)) / (depth + (mass + 1.0).log2());
                    score += rest * seen;
                    if let Some(a) = attribution.as_deref_mut() {
                        for slot in a.iter_mut() {
                            *slot += rest * seen * normalizer / DIMS as f64;
                        }
                    }
                } else {
                    // Certainly cut off from a single point: spread as a cut would fall.
                    let unseen = 1.0 / (depth + 1.0);
                    score += rest * unseen;
                    if let Some(a) = attribution.as_deref_mut() {
                        for d in 0..DIMS {
                            a[d] += rest * unseen * outside[d] / ext * normalizer;
                        }
                    }
                }
                return score * normalizer;
            }
            if ext > 0.0 {
                let p = ext / range;
                let unseen = 1.0 / (depth + 1.0);
                score += rest * p * unseen;
                if let Some(a) = attribution.as_deref_mut() {
                    for d in 0..DIMS {
                        a[d] += rest * unseen * outside[d] / range * normalizer;
                    }
                }
                rest *= 1.0 - p;
            }
            v = if q[node.dim as usize] <= node.cut {
                node.left
            } else {
                node.right
            };
            depth += 1.0;
        }
    }
}

/// The largest `f32` below `x` (a cut strictly under a point).
fn next_below(x: f32) -> f32 {
    if !x.is_finite() {
        x
    } else if x > 0.0 {
        f32::from_bits(x.to_bits() - 1)
    } else if x == 0.0 {
        -f32::from_bits(1)
    } else {
        f32::from_bits(x.to_bits() + 1)
    }
}

/// A forest of random cut trees over one stream.
#[derive(Debug, Clone)]
pub struct Forest {
    config: ForestConfig,
    pub(crate) trees: Vec<Tree>,
    /// Points offered so far (the samplers' clock).
    pub(crate) updates: u64,
    rng: Rng,
}

impl Forest {
    pub fn new(config: ForestConfig) -> Self {
        let mut rng = Rng(config.seed);
        let trees = (0..config.trees)
            .map(|_| Tree::new(config.sample_size, Rng(rng.next_u64())))
            .collect();
        Self {
            config,
            trees,
            updates: 0,
            rng,
        }
    }

    pub fn config(&self) -> &ForestConfig {
        &self.config
    }

    /// Points offered so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// The anomaly score of `q` against the current samples (0 for an empty forest).
    pub fn score(&self, q: &Point) -> f64 {
        if self.trees.is_empty() {
            return 0.0;
        }
        self.trees.iter().map(|t| t.score(q, None)).sum::<f64>() / self.trees.len() as f64
    }

    /// The score split over the dimensions; the parts add up to [`Forest::score`].
    pub fn attribution(&self, q: &Point) -> [f64; DIMS] {
        let mut total = [0.0; DIMS];
        if self.trees.is_empty() {
            return total;
        }
        for tree in &self.trees {
            tree.score(q, Some(&mut total));
        }
        let n = self.trees.len() as f64;
        total.iter_mut().for_each(|v| *v /= n);
        total
    }

    /// Offer `p` to every tree's sampler.
    pub fn update(&mut self, p: &Point) {
        self.updates += 1;
        let base = -self.config.time_decay * self.updates as f64;
        for tree in &mut self.trees {
            // Efraimidis–Spirakis with exponential time decay: keep the smallest
            // `-λt + ln(-ln u)`, which favours recent points.
            let u = self.rng.unit();
            let weight = base + (-u.ln()).ln();
            tree.update(p, weight, self.config.sample_size);
        }
    }

    /// A forest holding exactly these samples (per tree: points and weights), its trees rebuilt
    /// with the given generators: how a snapshot is restored.
    pub(crate) fn restore(
        config: ForestConfig,
        updates: u64,
        rng: u64,
        samples: Vec<(u64, Vec<(f64, Point)>)>,
    ) -> Self {
        let trees = samples
            .into_iter()
            .map(|(tree_rng, points)| {
                let mut tree = Tree::new(config.sample_size, Rng(tree_rng));
                for (weight, point) in points {
                    let slot = tree.points.len() as u32;
                    let leaf = tree.insert(&point);
                    tree.points.push(point);
                    tree.weights.push(weight);
                    tree.leaf_of.push(leaf);
                    tree.heap.push(Weighted(weight, slot));
                }
                tree
            })
            .collect();
        Self {
            config,
            trees,
            updates,
            rng: Rng(rng),
        }
    }

    pub(crate) fn rng_state(&self) -> u64 {
        self.rng.0
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn gaussian(rng: &mut Rng) -> f32 {
        // Box–Muller.
        let (u, v) = (rng.unit(), rng.unit());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }

    fn cloud(rng: &mut Rng) -> Point {
        let mut p = [0.0; DIMS];
        p.iter_mut().for_each(|x| *x = gaussian(rng));
        p
    }

    fn trained(trees: usize, sample_size: usize, n: usize) -> (Forest, Rng) {
        let mut forest = Forest::new(ForestConfig::new(trees, sample_size, 7));
        let mut rng = Rng(99);
        for _ in 0..n {
            forest.update(&cloud(&mut rng));
        }
        (forest, rng)
    }

    /// Walks a tree checking masses, boxes and parent links against its sample.
    fn check(tree: &Tree) {
        fn walk(t: &Tree, v: u32, points: &mut Vec<Point>) -> (u32, Point, Point) {
            let n = &t.nodes[v as usize];
            if n.is_leaf() {
                for _ in 0..n.mass {
                    points.push(n.lo);
                }
                return (n.mass, n.lo, n.hi);
            }
            assert_eq!(t.nodes[n.left as usize].parent, v);
            assert_eq!(t.nodes[n.right as usize].parent, v);
            let (ml, lol, hil) = walk(t, n.left, points);
            let (mr, lor, hir) = walk(t, n.right, points);
            assert!(hil[n.dim as usize] <= n.cut, "left side beyond the cut");
            assert!(lor[n.dim as usize] > n.cut, "right side within the cut");
            let mut lo = lol;
            let mut hi = hil;
            for d in 0..DIMS {
                lo[d] = lo[d].min(lor[d]);
                hi[d] = hi[d].max(hir[d]);
            }
            assert_eq!((n.mass, n.lo, n.hi), (ml + mr, lo, hi));
            (n.mass, n.lo, n.hi)
        }
        let mut in_tree = Vec::new();
        if tree.root != NONE {
            walk(tree, tree.root, &mut in_tree);
        }
        let mut sample = tree.points.clone();
        let key = |p: &Point| p.map(f32::to_bits);
        in_tree.sort_by_key(key);
        sample.sort_by_key(key);
        assert_eq!(in_tree, sample);
    }

    #[test]
    fn trees_stay_consistent_with_their_samples_through_inserts_evictions_and_duplicates() {
        let mut forest = Forest::new(ForestConfig::new(3, 32, 1));
        let mut rng = Rng(5);
        for i in 0..3000 {
            // Every fifth point repeats an earlier one: duplicates share a leaf.
            let p = if i % 5 == 0 {
                [1.0, 2.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0]
            } else {
                cloud(&mut rng)
            };
            forest.update(&p);
        }
        for tree in &forest.trees {
            assert_eq!(tree.points.len(), 32);
            assert_eq!(tree.mass(), 32);
            check(tree);
        }
    }

    #[test]
    fn an_isolated_outlier_scores_far_above_inliers() {
        let (forest, mut rng) = trained(50, 256, 4000);
        let inliers: Vec<f64> = (0..200).map(|_| forest.score(&cloud(&mut rng))).collect();
        let mean = inliers.iter().sum::<f64>() / inliers.len() as f64;
        // Published behaviour: inliers score about 1.
        assert!((0.6..1.6).contains(&mean), "inlier mean {mean}");
        let mut outlier = [0.0; DIMS];
        outlier[0] = 12.0;
        let score = forest.score(&outlier);
        // Cut off near the root: about log2(256) / 2 = 4, far above any inlier.
        assert!(score > 3.0, "outlier {score}");
        let max_inlier = inliers.iter().cloned().fold(0.0, f64::max);
        assert!(score > 1.5 * max_inlier, "{score} vs {max_inlier}");
    }

    #[test]
    fn an_outliers_score_grows_like_the_log_of_the_sample_size() {
        let mut outlier = [0.0; DIMS];
        outlier[3] = -15.0;
        let scores: Vec<f64> = [32, 128, 512]
            .iter()
            .map(|&s| trained(40, s, 4 * s).0.score(&outlier))
            .collect();
        // Each 4× sample adds about log2(4) / 2 = 1: growth, but far less than 4×.
        assert!(scores[0] < scores[1] && scores[1] < scores[2], "{scores:?}");
        for w in scores.windows(2) {
            let step = w[1] - w[0];
            assert!((0.4..1.8).contains(&step), "{scores:?}");
        }
    }

    #[test]
    fn attribution_adds_up_to_the_score_and_names_the_odd_dimension() {
        let (forest, _) = trained(40, 128, 2000);
        let mut q = [0.0; DIMS];
        q[5] = 9.0;
        let parts = forest.attribution(&q);
        let score = forest.score(&q);
        assert!((parts.iter().sum::<f64>() - score).abs() < 1e-6 * score.max(1.0));
        let top = (0..DIMS)
            .max_by(|&a, &b| parts[a].total_cmp(&parts[b]))
            .unwrap();
        assert_eq!(top, 5);
        assert!(parts[5] > 0.8 * score, "{parts:?}");
    }

    #[test]
    fn recent_points_replace_old_ones_so_a_shifted_stream_becomes_normal() {
        let (mut forest, mut rng) = trained(30, 64, 1000);
        let shifted = |rng: &mut Rng| {
            let mut p = cloud(rng);
            p[0] += 20.0;
            p
        };
        let probe = shifted(&mut Rng(1234));
        let before = forest.score(&probe);
        for _ in 0..3000 {
            forest.update(&shifted(&mut rng));
        }
        let after = forest.score(&probe);
        assert!(before > 2.5 && after < 1.6, "{before} → {after}");
    }

    #[test]
    fn forests_are_deterministic_for_a_seed() {
        let (a, _) = trained(10, 64, 500);
        let (b, _) = trained(10, 64, 500);
        let q = [3.0; DIMS];
        assert_eq!(a.score(&q), b.score(&q));
    }
}

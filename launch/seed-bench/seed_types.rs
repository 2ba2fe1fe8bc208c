// The seed crate's supporting types (paged_kv/types.rs), written from its documented API: the
// seed's PagedKvCache (seed_cache.rs) compiles against them unchanged.
use std::fmt;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockId(pub u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeqId(pub u64);

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "B{}", self.0)
    }
}

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "S{}", self.0)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub enum EvictionStrategy {
    #[default]
    LRU,
    LFU,
    LongestFirst,
    Priority { levels: usize },
    StreamingLLM { sink_tokens: usize, window_tokens: usize },
}

impl fmt::Display for EvictionStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EvictionStrategy::LRU => write!(f, "LRU"),
            EvictionStrategy::LFU => write!(f, "LFU"),
            EvictionStrategy::LongestFirst => write!(f, "LongestFirst"),
            EvictionStrategy::Priority { levels } => write!(f, "Priority({})", levels),
            EvictionStrategy::StreamingLLM { sink_tokens, window_tokens } => {
                write!(f, "StreamingLLM(sink={}, window={})", sink_tokens, window_tokens)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct SequenceInfo {
    pub seq_id: SeqId,
    pub num_tokens: usize,
    pub block_ids: Vec<BlockId>,
    pub last_access: Instant,
    pub access_count: u64,
    pub priority: u32,
}

impl SequenceInfo {
    pub fn new(seq_id: SeqId) -> Self {
        Self { seq_id, num_tokens: 0, block_ids: Vec::new(), last_access: Instant::now(), access_count: 0, priority: 0 }
    }

    pub fn touch(&mut self) {
        self.last_access = Instant::now();
        self.access_count += 1;
    }

    pub fn num_blocks(&self) -> usize {
        self.block_ids.len()
    }
}

#[derive(Debug, Clone, Default)]
pub struct CacheStats {
    pub total_allocations: u64,
    pub total_frees: u64,
    pub total_evictions: u64,
    pub total_forks: u64,
    pub peak_blocks_used: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PagedKvError {
    OutOfMemory { requested: usize, available: usize },
    SequenceNotFound(SeqId),
    BlockNotFound(BlockId),
    InvalidOperation(String),
}

impl fmt::Display for PagedKvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PagedKvError::OutOfMemory { requested, available } => {
                write!(f, "Out of memory: requested {} blocks, {} available", requested, available)
            }
            PagedKvError::SequenceNotFound(id) => write!(f, "Sequence not found: {}", id),
            PagedKvError::BlockNotFound(id) => write!(f, "Block not found: {}", id),
            PagedKvError::InvalidOperation(msg) => write!(f, "Invalid operation: {}", msg),
        }
    }
}

pub type PagedKvResult<T> = Result<T, PagedKvError>;

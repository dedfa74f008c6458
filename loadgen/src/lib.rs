//! loadgen library: the plan, schedules, workers and reports behind the `loadgen` binary.
pub mod audit;
pub mod http;
pub mod plan;
pub mod report;
pub mod schedule;
pub mod timer;
pub mod tls;
pub mod worker;

//! The route table: which routes need which scope, limits and usage, and how a request's path is
//! matched to one of them (with axum's `MatchedPath`, or the table's own canonicalising matcher).

mod path;
mod table;

pub use table::{RoutePolicy, RouteTable, Unmapped};

pub(crate) use table::{Requirement, RouteEntry};

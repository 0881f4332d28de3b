//! Behaviour tests of the resolver, one module per area, with shared builders.

mod builders;
mod categorize;
mod frontends;
mod index;
mod policies;
mod props;
mod sharding;

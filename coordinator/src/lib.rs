//! The per-job coordinator service and its client: run spec, rendezvous, heartbeats, restart policy and metrics
//! relay. Not built yet: this crate holds the place the architecture gives it (see `shared/design/architecture.md`).

//! GrapeVine facade.

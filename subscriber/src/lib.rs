//! grapevine-subscriber

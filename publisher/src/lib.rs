//! grapevine-publisher

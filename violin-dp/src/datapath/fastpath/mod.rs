//! The per-packet path: `rx → switch → police → encap → tx`. Everything in here runs for
//! every frame: no allocation, no locks, no logging; time is passed in.
//!
//! - [`switch`]: decides where a frame goes (and polices it through [`police`], or
//!   queues it on a capped link through [`shape`]);
//! - [`encap`]: VXLAN encapsulation/decapsulation around the switch;
//! - [`pairs`]: the switch's per-pair tables (links, counters), linear in what they hold;
//! - the transports that move the bytes live in [`crate::datapath::transport`].

pub mod encap;
pub mod pairs;
pub mod police;
pub mod shape;
pub mod switch;

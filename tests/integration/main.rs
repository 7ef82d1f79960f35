//! Integration tests, in one crate so that the model is compiled and linked once for all of
//! them (each file under tests/ would otherwise be its own crate).

mod book;
mod checkpoint;
mod cli;
mod common;
mod data;
mod demo;
mod faults;
mod generation;
mod grpo_learns;
mod hosted;
mod lora;
mod memory;
mod parallel;
mod parity;
mod processor;
mod rewards;
mod safety;
mod scale;
mod shared;
mod streaming;

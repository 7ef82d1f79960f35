pub mod bench;
pub mod data;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod train;
pub mod verify;

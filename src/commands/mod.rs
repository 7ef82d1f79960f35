pub mod data;
pub mod generate;
pub mod inspect;
pub mod verify;
pub mod train;

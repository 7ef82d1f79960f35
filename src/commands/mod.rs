pub mod generate;
pub mod inspect;
pub mod verify;

pub mod inspect;
pub mod verify;

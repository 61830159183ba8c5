pub mod config;
pub mod openai;
pub mod protocol;
pub mod storage;

//! What the replay tool shares with the benchmark programs beside it (`examples/`): the request
//! trace, read from the Azure LLM inference trace's CSV or made up with a long-tailed length mix.

pub mod trace;

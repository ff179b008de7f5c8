//! The orchestration library users embed: snapshotter, runner, registry, peer, terminator.

//! The one place the AWS SDK configuration is built.
//!
//! The SDK resolves region, credentials and endpoint itself, honouring `AWS_ENDPOINT_URL` (and
//! per-service `AWS_ENDPOINT_URL_SQS`, …), which is how the same binaries talk to moto or the
//! local runner's endpoints. An explicit endpoint, when given, wins.

use aws_config::{BehaviorVersion, SdkConfig};

/// Load the SDK configuration, optionally pointing every client at `endpoint_url`.
pub async fn sdk_config(endpoint_url: Option<&str>) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(endpoint) = endpoint_url {
        loader = loader.endpoint_url(endpoint);
    }
    loader.load().await
}

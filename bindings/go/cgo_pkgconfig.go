//go:build packinfer_pkgconfig

package packinfer

// With -tags packinfer_pkgconfig the package uses an installed PackInfer: pkg-config must find
// packinfer.pc (set PKG_CONFIG_PATH to <prefix>/lib/pkgconfig for a non-system prefix).

/*
#cgo pkg-config: packinfer
*/
import "C"

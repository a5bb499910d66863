//go:build !packinfer_pkgconfig

package packinfer

// By default the package builds against this repository's checkout: the header in include/ and
// the library cargo built in target/release (found at run time through the rpath, as
// libpackinfer.so.1, its SONAME: build.rs leaves that link there). Build with
// -tags packinfer_pkgconfig to use an installed PackInfer through pkg-config instead.

/*
#cgo CFLAGS: -I${SRCDIR}/../../include
#cgo LDFLAGS: -L${SRCDIR}/../../target/release -Wl,-rpath,${SRCDIR}/../../target/release -lpackinfer
*/
import "C"
